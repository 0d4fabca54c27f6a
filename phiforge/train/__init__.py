"""Training: pretraining and fine-tuning from one CPU to many GPUs, with exact resume.

    from phiforge.train import TrainConfig, load_train_config, train
    cfg = load_train_config("tiny", ["data=runs/x/tokens", "out=runs/x/train", "max_steps=200"])
    result = train(cfg)            # TrainResult: checkpoint, log_path, val_loss, train_loss, steps, tokens

Modules: config (TrainConfig, YAML + overrides), data (resumable chunk loader), optim (AdamW groups, schedule),
parallel (act-ckpt -> compile -> FSDP2/DDP in one place), state (checkpoints), metrics (JSONL, TensorBoard,
MFU), loop (the loop). Importing this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phiforge.train.config import TrainConfig, from_dict, load_train_config

if TYPE_CHECKING:
    from phiforge.train.loop import TrainResult

__all__ = ["TrainConfig", "from_dict", "load_train_config", "train"]


def train(cfg: TrainConfig, *, resume: Any = False, on_step: Any = None) -> TrainResult:
    """Run training per `cfg` (see phiforge.train.loop.train)."""
    from phiforge.train.loop import train as _train

    return _train(cfg, resume=resume, on_step=on_step)
