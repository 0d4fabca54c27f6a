"""Generate text from a checkpoint directory (weights + tokenizer).

Greedy by default (--temperature 0); sampling with --temperature/--top-k/--top-p and a --seed for
reproducibility. A single prompt streams to the terminal as it is generated; several prompts run as one
left-padded batch and print when done. Throughput (new tokens/s) goes to stderr.

  phiforge generate --model runs/phi-100m/final "def fibonacci(n):" --max-new-tokens 64 --stop "\\ndef "
"""

from __future__ import annotations

import argparse
import sys
import time

from phiforge.commands.flags import add_dtype, add_max_new_tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (several prompts form a batch)")
    parser.add_argument("--model", required=True, help="checkpoint directory with config, weights and tokenizer "
                                                       "(or phiforge:DIR, or a hub id)")
    add_max_new_tokens(parser, 128, "new tokens per prompt at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages tokens already in the text (HF semantics)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (same seed, same text)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when this text appears (repeatable); the text is cut before it")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-text token")
    add_dtype(parser, "weights dtype (default: as stored)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--no-stream", action="store_true", help="print the text only when it is complete")


def main(args: argparse.Namespace) -> int:
    from phiforge.checkpoint import load_checkpoint
    from phiforge.errors import ConfigError
    from phiforge.generate import GenerationConfig, generate
    from phiforge.lm.spec import checkpoint_dir
    from phiforge.serve.load import checkpoint_tokenizer

    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                           stop=[s.encode().decode("unicode_escape") for s in args.stop],
                           ignore_eos=args.ignore_eos)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    path = checkpoint_dir(args.model)
    tokenizer = checkpoint_tokenizer(path)
    model = load_checkpoint(path, dtype=args.dtype, device=args.device)

    stream = sys.stdout if len(args.prompts) == 1 and not args.no_stream else None
    if stream is not None:
        stream.write(args.prompts[0])
        stream.flush()
    n = 0

    def count(row: int, token_id: int) -> None:
        nonlocal n
        n += 1

    start = time.perf_counter()
    texts = generate(model, tokenizer, args.prompts, cfg, stream=stream, on_token=count)
    elapsed = time.perf_counter() - start
    if stream is None:
        for prompt, text in zip(args.prompts, texts):
            print(prompt + text)
            if len(args.prompts) > 1:
                print("-" * 40)
    print(f"[{n} tokens in {elapsed:.2f}s: {n / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0
