"""Export a checkpoint to another format. `gguf`: a GGUF file for llama.cpp's phi2 architecture (weights in
f16, f32, q8_0 or q4_0, with the tokenizer), e.g.

  phiforge export gguf --model runs/phi-100m/final --out phi-100m.gguf --quant q8_0
  llama-cli -m phi-100m.gguf -p "Instruct: what is 2+2?\\nOutput:"
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=["gguf"], help="output format")
    parser.add_argument("--model", required=True, help="checkpoint directory with config, weights and tokenizer")
    parser.add_argument("--out", required=True, help="output file, e.g. model.gguf")
    from phiforge.commands.flags import add_gguf_quant
    from phiforge.serve.gguf_export import QUANTS  # no heavy imports at module level

    # GGUF's tensor types, the one place --quant does not mean phiforge's int8/int4 (taken as q8_0/q4_0 here);
    # q8_0 / q4_0 are ggml's 8- / 4-bit blocks of 32
    add_gguf_quant(parser, QUANTS, "f16")


def main(args: argparse.Namespace) -> int:
    from phiforge.checkpoint import human_bytes
    from phiforge.serve.gguf_export import export_gguf

    out = export_gguf(args.model, args.out, quant=args.quant)
    print(f"wrote {out} ({human_bytes(out.stat().st_size)}, {args.quant})")
    return 0
