"""The flags several commands share, spelled one way everywhere: `--dtype {fp32,bf16,fp16}`,
`--max-new-tokens N`, `--out PATH`. Spellings of earlier versions (`--max-tokens`, `--output`, `--dtype auto`,
`--dtype bfloat16`, ...) still parse to the same values but are left out of `--help`."""

from __future__ import annotations

import argparse

DTYPES = ("fp32", "bf16", "fp16")
_DTYPE_SPELLINGS = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                    "float16": "fp16", "auto": None}


def dtype_arg(text: str) -> str | None:
    """An argparse type: a dtype name in its one spelling (fp32, bf16, fp16); "auto" is None (as stored)."""
    if text not in _DTYPE_SPELLINGS:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(DTYPES)})")
    return _DTYPE_SPELLINGS[text]


def add_dtype(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str) -> None:
    """`--dtype {fp32,bf16,fp16}`, default None (the stored dtype, or the backend's own)."""
    parser.add_argument("--dtype", type=dtype_arg, default=None, metavar="{fp32,bf16,fp16}", help=help)


def add_max_new_tokens(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: int | None, help: str,
                       *, prefix: str = "", old: str = "--max-tokens") -> None:
    """`--[PREFIX]max-new-tokens N`, with the old spelling `old` as a hidden alias of the same value."""
    dest = f"{prefix}max_new_tokens".replace("-", "_")
    parser.add_argument(f"--{prefix}max-new-tokens", dest=dest, type=int, default=default, metavar="N", help=help)
    add_hidden_alias(parser, old, dest, type=int)


def add_hidden_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, dest: str,
                     **kw) -> None:
    """An old spelling of an option: sets the same `dest`, absent from --help, never overrides the default."""
    parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)
