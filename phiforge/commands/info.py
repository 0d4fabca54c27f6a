"""Print what a model is: its config (every field), parameter counts, head and rotary dims, stored dtype, size on
disk and tokenizer. Takes a checkpoint directory (HF or original microsoft/phi layout), a hub id, a preset name
(phi-1, phi-1.5, phi-2, tiny, small, phi-100m) or a config file; for a preset it shows the size the weights would
have in fp32 and bf16."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR_OR_PRESET",
                        help="checkpoint directory, hub id (org/name), preset name or model config file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable report of `phiforge.checkpoint.summarize`."""
    from phiforge.checkpoint import human_bytes

    lines = [f"{s['source']}  ({s['kind']})", ""]
    p = s["params"]
    lines.append(f"parameters      {p['total']:,} total, {p['non_embedding']:,} non-embedding "
                 f"({p['total'] / 1e6:.1f}M / {p['non_embedding'] / 1e6:.1f}M)")
    lines.append(f"head dim        {s['head_dim']}")
    lines.append(f"rotary dim      {s['rotary_dim']}")
    w = s["weights"]
    if w:
        mixed = ""
        if len(w["dtypes"]) > 1:  # e.g. fp32 LayerNorms beside fp16 weights
            mixed = f" (mixed: {', '.join(f'{k} x{n}' for k, n in w['dtypes'].items())})"
        lines.append(f"stored dtype    {w['dtype']}{mixed}")
        lines.append(f"size on disk    {w['size']} ({w['bytes']:,} bytes in {w['files']} file(s), "
                     f"{w['tensors']} tensors)")
    else:
        sizes = s["size_if_stored"]
        lines.append("weights         none (sizes if stored: "
                     f"fp32 {human_bytes(sizes['float32'])}, bf16 {human_bytes(sizes['bfloat16'])})")
    t = s["tokenizer"]
    if t["present"]:
        fits = ""
        if not t["fits_model_vocab"]:
            fits = f"  WARNING: larger than the model's vocab {s['config']['vocab_size']}"
        lines.append(f"tokenizer       {t['size']:,} tokens (padded to {t['padded_size']:,}), eos "
                     f"{t['eos_token']!r} = {t['eos_token_id']}{', chat template' if t['chat_template'] else ''}"
                     f"{fits}")
    else:
        lines.append("tokenizer       none")
    lines += ["", "config"]
    width = max(len(k) for k in s["config"])
    lines += [f"  {k.ljust(width)}  {v}" for k, v in s["config"].items()]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from phiforge.checkpoint import summarize

    summary = summarize(args.model)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
