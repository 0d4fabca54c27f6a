"""Tokenize a corpus and pack it into memory-mapped token shards for training.

Inputs are JSONL (one object per line, text under --text-field), Parquet (column --text-field) or plain-text
files (one document per file); paths, directories and globs are accepted. The tokenizer is either given
(--tokenizer DIR_OR_JSON) or trained on the inputs first (--train-tokenizer VOCAB). Output: OUT/manifest.json,
OUT/tokenizer/, OUT/train-*.bin and OUT/val-*.bin (uint16 when the vocabulary fits, else uint32), EOS after
every document, a deterministic hash-based train/val split.

Bad records (invalid JSON, missing text field, non-UTF-8 bytes) are skipped and reported as file:line;
--strict makes the first one an error.

Fine-tuning data (--format completion | chat, JSONL): {"prompt": ..., "completion": ...} records, or
{"messages": [{"role": ..., "content": ...}, ...]} rendered by --template (shipped: phi-2 "Instruct: ...\nOutput:",
chatml; or a YAML file, see phiforge/data/templates/). Beside the token shards it writes a per-token loss mask
(OUT/<split>-*.mask: 1 on completion / assistant tokens and the closing EOS) and the example boundaries
(OUT/<split>-offsets.bin); `phiforge train` packs whole examples into rows, keeps them apart and trains on the
masked tokens only. An example longer than --seq-len + 1 tokens is fitted by --overlong: truncate (cut prompt
tokens from the left; drop it if the completion alone is too long) or drop; both are counted in the manifest.
A record without prompt/completion, an empty completion or a message with a role the template does not know is
a bad record.

examples:
  phiforge tokenize 'data/curated/*.jsonl' --train-tokenizer 8192 --out runs/tiny/tokens
  phiforge tokenize exercises.jsonl --format completion --tokenizer runs/tiny/tokens/tokenizer --seq-len 256 \
      --out runs/tiny/ft-tokens
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="input files, directories or globs (.jsonl[.gz], .parquet, .txt)")
    parser.add_argument("--out", "-o", required=True, help="output directory for shards + manifest.json")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--tokenizer", help="an existing tokenizer (directory with tokenizer.json, or the file)")
    group.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                       help="train a byte-level BPE tokenizer of this vocabulary size on the inputs")
    parser.add_argument("--min-frequency", type=int, default=2, help="BPE merge min frequency (with --train-tokenizer)")
    parser.add_argument("--text-field", default="text", help="JSON key (dotted for nested) or Parquet column of the text")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="fraction of documents (by a hash of their text) held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="key of the train/val split hash")
    parser.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: CPU count)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 28, help="maximum tokens per shard file")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.add_argument("--format", dest="records", choices=["text", "completion", "chat"], default="text",
                        help="records: text documents (default), prompt/completion or chat fine-tuning examples")
    parser.add_argument("--template", default=None,
                        help="chat template for --format chat: phi-2 (default), chatml, or a YAML file")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="fine-tuning examples: the training seq_len; longer examples are fitted (default 2048)")
    parser.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                        help="an example longer than --seq-len + 1 tokens: truncate its prompt from the left, or drop it")


def main(args: argparse.Namespace) -> int:
    from phiforge.data.pack import pack_corpus

    res = pack_corpus(args.inputs, args.out, tokenizer=args.tokenizer, train_vocab=args.train_tokenizer,
                      min_frequency=args.min_frequency, text_field=args.text_field,
                      val_fraction=args.val_fraction, seed=args.seed, workers=args.workers, strict=args.strict,
                      shard_tokens=args.shard_tokens, records=args.records, template=args.template,
                      seq_len=args.seq_len, overlong=args.overlong)
    m = res.manifest
    bad = m["bad_lines"]
    for line in bad["examples"]:
        print(f"phiforge: skipped {line}", file=sys.stderr)
    if bad["count"] > len(bad["examples"]):
        print(f"phiforge: ... and {bad['count'] - len(bad['examples'])} more bad records", file=sys.stderr)
    print(f"{res.out_dir}: {m['documents']:,} documents from {len(m['sources'])} file(s), "
          f"{res.train_tokens:,} train + {res.val_tokens:,} val tokens ({m['dtype']}, vocab {m['vocab_size']:,}), "
          f"{bad['count']} bad record(s), {m['seconds']:.1f}s")
    if "examples" in m:
        ex = m["examples"]
        loss = m["splits"]["train"]["loss_tokens"] + m["splits"]["val"]["loss_tokens"]
        print(f"{m['records']} examples: {loss:,} trained tokens; {ex['truncated']:,} truncated, {ex['dropped']:,} "
              f"dropped (longer than {ex['max_tokens']} tokens, --overlong {ex['overlong']})")
    return 0
