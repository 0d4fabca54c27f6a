"""Tokenize a corpus and pack it into memory-mapped token shards for training.

Inputs are JSONL (one object per line, text under --text-field), Parquet (column --text-field) or plain-text
files (one document per file); paths, directories and globs are accepted. The tokenizer is either given
(--tokenizer DIR_OR_JSON) or trained on the inputs first (--train-tokenizer VOCAB). Output: OUT/manifest.json,
OUT/tokenizer/, OUT/train-*.bin and OUT/val-*.bin (uint16 when the vocabulary fits, else uint32), EOS after
every document, a deterministic hash-based train/val split.

Bad records (invalid JSON, missing text field, non-UTF-8 bytes) are skipped and reported as file:line;
--strict makes the first one an error.

example:
  phiforge tokenize 'data/curated/*.jsonl' --train-tokenizer 8192 --out runs/tiny/tokens
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


def main(args: argparse.Namespace) -> int:
    from phiforge.data.pack import pack_corpus

    res = pack_corpus(args.inputs, args.out, tokenizer=args.tokenizer, train_vocab=args.train_tokenizer,
                      min_frequency=args.min_frequency, text_field=args.text_field,
                      val_fraction=args.val_fraction, seed=args.seed, workers=args.workers, strict=args.strict,
                      shard_tokens=args.shard_tokens)
    m = res.manifest
    bad = m["bad_lines"]
    for line in bad["examples"]:
        print(f"phiforge: skipped {line}", file=sys.stderr)
    if bad["count"] > len(bad["examples"]):
        print(f"phiforge: ... and {bad['count'] - len(bad['examples'])} more bad records", file=sys.stderr)
    print(f"{res.out_dir}: {m['documents']:,} documents from {len(m['sources'])} file(s), "
          f"{res.train_tokens:,} train + {res.val_tokens:,} val tokens ({m['dtype']}, vocab {m['vocab_size']:,}), "
          f"{bad['count']} bad record(s), {m['seconds']:.1f}s")
    return 0
