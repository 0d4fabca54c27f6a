"""Pretrain or fine-tune a Phi model from packed token shards (`phiforge tokenize`).

The run is described by a YAML recipe (a path, or a shipped name: tiny, phi-1.5, phi-2) whose keys are the
fields of phiforge.train.TrainConfig; unknown keys are errors. Change any key from the command line with
`--set KEY=VALUE` (repeatable; VALUE is parsed as YAML; model fields via model_overrides.FIELD=VALUE).
To fine-tune, set `model` to a checkpoint directory (e.g. a converted phi-2).

Fine-tuning on exercises (phi-1's second stage; recipe configs/phi-1-exercises.yaml): tokenize prompt/completion
or chat JSONL with `phiforge tokenize --format completion|chat --tokenizer CKPT --seq-len T`; training then packs
whole examples into rows, keeps them apart (block-diagonal attention, positions restarting per example) and
takes the loss on completion tokens only, also for the validation loss.

LoRA (--lora-rank R, through peft): only adapters on every block's q/k/v/dense/fc1/fc2 train and are
checkpointed (adapter_config.json + adapter_model.safetensors, PEFT's layout); --merge also writes OUT/merged/,
a plain HF-layout checkpoint of base + adapters that transformers and every phiforge command load.
Memory of a phi-2 LoRA run (2.78B parameters; r=16 on all six projections = 23.6M adapter parameters;
seq_len 2048, micro_batch 1; from the tensors autograd saves on a 2-layer model of phi-2's width, scaled to 32):
frozen fp32 base 10.4 GiB + adapters, gradients and AdamW state 0.35 GiB + activations. On a GPU (bf16
autocast): 17 GiB of activations (autocast's bf16 weight copies, 4.7 GiB, included; 11.4 GiB with
lora_dropout 0), ~1.2 GiB with activation_checkpointing: ~12 GiB in all, a 16 GB GPU. On a CPU (fp32): 18 GiB
of activations, ~1.2 GiB with activation_checkpointing: a 16 GB machine. Activations grow with micro_batch x
seq_len.

Scale out with the same command under torchrun: DDP by default, FSDP2 with --fsdp.

examples:
  phiforge train --config tiny --set data=runs/tiny/tokens --set out=runs/tiny/train
  phiforge train --config tiny --set out=runs/tiny/train --resume
  torchrun --nproc_per_node 8 -m phiforge train --config phi-1.5 --set data=tokens --fsdp
  phiforge train --config my.yaml --set lr=3e-4 --set model_overrides.num_hidden_layers=2
  phiforge train --config phi-1-exercises --set model=runs/phi-2 --set data=ex-tokens --lora-rank 16 --merge

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
    parser.add_argument("--lora-rank", type=int, default=None, metavar="R",
                        help="train peft LoRA adapters of rank R on the checkpoint in `model` (lora_rank=R); see "
                             "above for memory")
    parser.add_argument("--merge", action="store_true",
                        help="with --lora-rank: after training write OUT/merged/ (base + adapters, HF layout)")


def main(args: argparse.Namespace) -> int:
    from phiforge.train import load_train_config, train

    overrides = list(args.overrides) + (["fsdp=true"] if args.fsdp else [])
    overrides += ([f"lora_rank={args.lora_rank}"] if args.lora_rank is not None else []) + \
        (["merge=true"] if args.merge else [])
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
        if res.merged is not None:
            print(f"merged LoRA adapters into {res.merged} (HF layout)", file=sys.stdout)
    return 0
