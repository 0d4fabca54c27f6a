"""Convert a checkpoint to the Hugging Face layout (config.json + safetensors), copying its tokenizer files.

SRC in the original microsoft/phi layout (model_type "phi-msft" or "mixformer-sequential": fused Wqkv,
transformer.h.N / layers.N names) is converted; SRC already in the HF layout is re-saved, e.g. to change its
dtype or sharding. The result loads in phiforge and in transformers' AutoModelForCausalLM."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from phiforge.commands.flags import add_dtype


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '1.5GiB' / '123' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint directory (original or HF layout) or hub id")
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist, unless --force)")
    add_dtype(parser, "dtype of the written weights (default: keep the stored dtype)")
    parser.add_argument("--max-shard-size", type=parse_size, default="2GB", metavar="SIZE",
                        help="split weights into safetensors shards of at most SIZE (default 2GB)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it already exists")


def main(args: argparse.Namespace) -> int:
    from phiforge.checkpoint import convert_checkpoint
    from phiforge.errors import PhiforgeError

    out = Path(args.out)
    if out.exists() and not args.force:
        raise PhiforgeError(f"{out}: already exists (use --force to replace it)")
    if out.exists() and Path(args.src).exists() and out.resolve() == Path(args.src).resolve():
        raise PhiforgeError(f"{out}: OUT must differ from SRC")
    result = convert_checkpoint(args.src, out, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    print(f"wrote {result}")
    return 0
