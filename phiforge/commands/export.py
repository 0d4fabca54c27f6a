"""Export a checkpoint to another format. `gguf`: a GGUF file for llama.cpp's phi2 architecture (weights in
f16, f32 or q8_0, with the tokenizer), e.g.

  phiforge export gguf --model runs/phi-100m/final --out phi-100m.gguf --quant q8_0
  llama-cli -m phi-100m.gguf -p "Instruct: what is 2+2?\\nOutput:"
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=["gguf"], help="output format")
    parser.add_argument("--model", required=True, help="checkpoint directory with config, weights and tokenizer")
    parser.add_argument("--out", required=True, help="output file, e.g. model.gguf")
    parser.add_argument("--quant", choices=["f16", "f32", "q8_0"], default="f16",
                        help="type of the 2-D weights (norms and biases stay f32)")


def main(args: argparse.Namespace) -> int:
    from phiforge.checkpoint import human_bytes
    from phiforge.serve.gguf_export import export_gguf

    out = export_gguf(args.model, args.out, quant=args.quant)
    print(f"wrote {out} ({human_bytes(out.stat().st_size)}, {args.quant})")
    return 0
