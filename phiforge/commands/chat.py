"""Chat with a model in the terminal. The conversation is kept (oldest turns are dropped when the context fills);
/reset clears it, /exit (or Ctrl-D) quits. Prompts use the tokenizer's chat template when it has one, else Phi's
base-model format "Instruct: <message>\\nOutput:". Replies stream as they are generated.

  phiforge chat --model runs/phi-100m/final --quant int8
  phiforge chat --model smollm2          # any Hugging Face causal LM (directory, .gguf) runs through transformers
"""

from __future__ import annotations

import argparse

from phiforge.commands.flags import add_dtype, add_max_new_tokens, add_quant, check_device

MODEL_HELP = ("a phiforge checkpoint directory (or phiforge:DIR, or a hub id), or a Hugging Face causal LM run "
              "through transformers: smollm2, hf:DIR_OR_HUB_ID, another model type's directory, a .gguf file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--system", default=None, help="a system message put before the conversation")
    add_max_new_tokens(parser, 256, "new tokens per reply at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    add_load_arguments(parser)


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The model-loading flags `chat` and `serve` share: quantization, dtype, device."""
    add_quant(parser)
    add_dtype(parser, "weights dtype (default: as stored)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def load_engine_from(args: argparse.Namespace, *, compile: bool = False):
    """The Engine the loading flags (`add_load_arguments`) describe."""
    from phiforge.serve.load import load_engine

    check_device(args.device)
    return load_engine(args.model, quant=None if args.quant == "none" else args.quant, group_size=args.group_size,
                       dtype=args.dtype, device=args.device, compile=compile)


def main(args: argparse.Namespace) -> int:
    import sys

    from phiforge.errors import ConfigError
    from phiforge.serve.chat import ChatSession, chat_loop

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    engine = load_engine_from(args)
    session = ChatSession(engine, system=args.system, max_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)
    return chat_loop(session, sys.stdin, sys.stdout, prompt=">>> " if sys.stdin.isatty() else "")
