"""Grow a trained small Phi into a larger one (Phi-1.5 -> Phi-2 "scaled knowledge transfer").

Width grows by copying units (residual channels, heads, head channels, MLP units) with the consuming weights
divided by the number of copies; depth grows by inserting identity blocks (or copies of their neighbours).
`hyperclone` + `identity` is function-preserving for any ratio, including d 2048 -> 2560 and head dim
64 -> 80 (the grown config's layer_norm_eps is scaled by the residual copy ratio for that). The report
printed says exactly which parts are exact and which approximate.

example:
  phiforge grow --from runs/phi-1.5 --to phi-2 --out runs/phi-2-grown
"""

from __future__ import annotations

import argparse

from phiforge.commands.flags import add_dtype
from phiforge.grow import DEPTH_METHODS, WIDTH_METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="src", required=True, metavar="SMALL_DIR",
                        help="the trained small checkpoint directory")
    parser.add_argument("--to", dest="to", required=True, metavar="CONFIG_OR_PRESET",
                        help="the large shape: a preset name (e.g. phi-2), a checkpoint dir or a JSON/YAML config")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the grown checkpoint")
    parser.add_argument("--width-method", choices=WIDTH_METHODS, default="hyperclone",
                        help="how new width is filled: hyperclone (exact, copies + mean channels), net2net "
                             "(random copies; exact except LayerNorm over the residual) or zero-pad (fresh "
                             "units; exact except LayerNorm over the residual) (default: hyperclone)")
    parser.add_argument("--residual-method", choices=WIDTH_METHODS, default=None,
                        help="how new residual channels are filled, if different from --width-method "
                             "(only hyperclone is LayerNorm-exact)")
    parser.add_argument("--depth-method", choices=DEPTH_METHODS, default="identity",
                        help="how new layers are filled: identity (exact: zero dense/fc2 outputs) or stack "
                             "(copies of the previous block, approximate) (default: identity)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="symmetry-breaking noise, as a fraction of each weight's std, added with zero sum "
                             "over the copies of a unit (keeps exactness) (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed for noise and random units (default: 0)")
    parser.add_argument("--keep-eps", action="store_true",
                        help="keep the large config's layer_norm_eps instead of scaling the small one by the "
                             "residual copy ratio (then non-integer width growth is only approximate)")
    add_dtype(parser, "dtype to save in (default: the small checkpoint's)")
    parser.add_argument("--verify", action="store_true",
                        help="after growing, run both models on random tokens and print the largest logit "
                             "difference")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from phiforge.atomic import atomic_write_json
    from phiforge.checkpoint import load_checkpoint, parse_dtype, save_checkpoint
    from phiforge.config import load_model_config
    from phiforge.errors import ConfigError
    from phiforge.grow import grow_model
    from phiforge.lm.spec import checkpoint_dir

    src = checkpoint_dir(args.src)
    large_cfg = load_model_config(args.to)
    dtype = parse_dtype(args.dtype)
    small = load_checkpoint(src, dtype=torch.float32)  # grow in fp32; save in the stored or requested dtype
    if large_cfg.vocab_size != small.config.vocab_size:
        raise ConfigError(f"{args.to}: vocab_size {large_cfg.vocab_size} differs from {src}/config.json's "
                          f"{small.config.vocab_size}; the grown model keeps the small model's tokenizer")
    large, report = grow_model(small, large_cfg, width_method=args.width_method, depth_method=args.depth_method,
                               noise=args.noise, seed=args.seed, adjust_eps=not args.keep_eps,
                               residual_method=args.residual_method)
    print(report.format())
    n_s, n_l = small.num_params(), large.num_params()
    print(f"parameters: {n_s:,} -> {n_l:,} (x{n_l / n_s:.2f})")
    if args.verify:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(small.config.vocab_size, (2, min(64, large.config.max_position_embeddings)),
                            generator=g)
        with torch.no_grad():
            diff = (large.eval()(ids) - small.eval()(ids)).abs().max().item()
        print(f"verify: max |logit difference| on random tokens = {diff:.3g}")
    if dtype is None:
        from phiforge.checkpoint import stored_dtype

        dtype = stored_dtype(src)
    out = save_checkpoint(large, args.out, dtype=dtype, tokenizer=src)
    atomic_write_json(Path(out) / "grow_report.json",
                      {"from": str(src), "to": str(args.to), "width_method": args.width_method,
                       "depth_method": args.depth_method,
                       "residual_method": args.residual_method or args.width_method, "noise": args.noise, "seed": args.seed,
                       **report.to_dict()})
    print(f"wrote {out}")
    return 0
