"""Pretrain or fine-tune a Phi model from packed token shards (`phiforge tokenize`).

The run is described by a YAML recipe (a path, or a shipped name: tiny, phi-1.5, phi-2) whose keys are the
fields of phiforge.train.TrainConfig; unknown keys are errors. Change any key from the command line with
`--set KEY=VALUE` (repeatable; VALUE is parsed as YAML; model fields via model_overrides.FIELD=VALUE).
To fine-tune, set `model` to a checkpoint directory (e.g. a converted phi-2).

Scale out with the same command under torchrun: DDP by default, FSDP2 with --fsdp.

examples:
  phiforge train --config tiny --set data=runs/tiny/tokens --set out=runs/tiny/train
  phiforge train --config tiny --set out=runs/tiny/train --resume
  torchrun --nproc_per_node 8 -m phiforge train --config phi-1.5 --set data=tokens --fsdp
  phiforge train --config my.yaml --set lr=3e-4 --set model_overrides.num_hidden_layers=2

Outputs: OUT/log.jsonl (one JSON record per step / eval), OUT/checkpoints/step-NNNNNN/ (HF layout + trainer
state), OUT/tensorboard/ with `tensorboard: true`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from phiforge.train.config import TrainConfig

    parser.epilog = "config keys (--set KEY=VALUE): " + ", ".join(f.name for f in fields(TrainConfig))
    parser.add_argument("--config", "-c", required=True,
                        help="training recipe: a YAML file or a shipped name (tiny, phi-1.5, phi-2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set lr=3e-4 --set max_steps=100 (repeatable)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from the newest checkpoint in the out directory (or from CHECKPOINT)")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (under torchrun)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def main(args: argparse.Namespace) -> int:
    from phiforge.train import load_train_config, train

    overrides = list(args.overrides) + (["fsdp=true"] if args.fsdp else [])
    cfg = load_train_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    res = train(cfg, resume=args.resume)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        val = f"{res.val_loss:.4f}" if res.val_loss is not None else "n/a"
        print(f"trained {res.steps} steps ({res.tokens:,} tokens): train loss {res.train_loss:.4f}, "
              f"val loss {val}; checkpoint {res.checkpoint}; log {res.log_path}", file=sys.stdout)
    return 0
