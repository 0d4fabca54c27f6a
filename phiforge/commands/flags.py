"""The flags several commands share, spelled one way everywhere: `--dtype {fp32,bf16,fp16}`,
`--max-new-tokens N`, `--out PATH`, `--quant {none,int8,int4}` (every command that loads a model; `export gguf`'s
`--quant` names GGUF types and takes int8 / int4 for q8_0 / q4_0). Spellings of earlier versions (`--max-tokens`,
`--output`, `--dtype auto`, `--dtype bfloat16`, ...) still parse to the same values but are left out of
`--help`."""

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


QUANTS = ("none", "int8", "int4")


def quant_arg(text: str) -> str:
    """An argparse type: a weight quantization of a loaded model (none, int8, int4)."""
    if text not in QUANTS:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(QUANTS)}; GGUF types "
                                         f"such as q8_0 are for `phiforge export gguf`)")
    return text


def add_quant(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, group_size: bool = True) -> None:
    """`--quant {none,int8,int4}` (weight-only quantization of the linear layers and the token embedding, applied
    while loading a phiforge checkpoint) and `--group-size N` (int4 on torch's kernel)."""
    parser.add_argument("--quant", type=quant_arg, default="none", metavar="{none,int8,int4}",
                        help="weight-only quantization of the linear layers and the token embedding, applied while "
                             "loading (the float model never exists): int8 per output row, int4 in groups; "
                             "phiforge checkpoints only")
    if group_size:
        parser.add_argument("--group-size", type=int, default=128, metavar="N",
                            help="int4 input channels per scale on torch's int4 kernel (the native int4 kernel, "
                                 "used where it is built, has groups of 32)")


# `export gguf --quant` names a GGUF tensor type; int8 and int4 are taken as the GGUF types that store them
GGUF_ALIASES = {"int8": "q8_0", "int4": "q4_0"}


def add_gguf_quant(parser: argparse.ArgumentParser | argparse._ArgumentGroup, types: tuple[str, ...],
                   default: str) -> None:
    """`--quant TYPE` of a GGUF export: one of `types` (GGUF tensor types, e.g. f16, q8_0), or int8 / int4 for
    q8_0 / q4_0 where the exporter writes them (the spelling of the other commands' --quant)."""
    aliases = {k: v for k, v in GGUF_ALIASES.items() if v in types}

    def gguf_type(text: str) -> str:
        if text in types:
            return text
        if text in aliases:
            return aliases[text]
        more = "; " + ", ".join(f"{k} = {v}" for k, v in aliases.items()) if aliases else ""
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(types)}{more})")

    shown = ", ".join(types)
    parser.add_argument("--quant", type=gguf_type, default=default, metavar="{" + ",".join(types) + "}",
                        help=f"GGUF type of the 2-D weights ({shown}; norms and biases stay f32)"
                             + (f"; {' and '.join(aliases)} mean {' and '.join(aliases.values())}" if aliases else ""))


def check_device(device: str) -> None:
    """A ConfigError (one line) for a --device this torch cannot run on, before any model is loaded."""
    import torch

    from phiforge.errors import ConfigError

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this torch ({torch.__version__}) has no CUDA device; use --device cpu "
                          f"(--quant int8/int4 run fastest there, on phiforge's native kernels)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: no Apple GPU (MPS) here; use --device cpu")
