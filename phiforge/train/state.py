"""Training checkpoints: HF-layout model + tokenizer + trainer_state.pt + train_config.yaml, atomically.

    out/checkpoints/step-000123/
        config.json, model.safetensors     the model (loads with phiforge or transformers); under LoRA instead
                                           adapter_config.json + adapter_model.safetensors (train/lora.py)
        tokenizer.json, ...                copied from the token shards' tokenizer
        trainer_state.pt                   optimizer, schedule, data position, RNG states of every rank
        train_config.yaml                  the TrainConfig of the run

A directory is built under a temporary name and renamed when complete, so a run killed mid-save never leaves a
checkpoint that looks whole; `latest_checkpoint` therefore only ever finds complete ones.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.yaml"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under out/checkpoints, oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and
             (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = list_checkpoints(out)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(out: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 keeps everything)."""
    if keep_last <= 0:
        return
    for p in list_checkpoints(out)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every RNG the step may draw from: Python, NumPy, torch CPU and (when present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(path: Path, write_model: Callable[[Path], Any], trainer_state: dict[str, Any],
                             config: dict[str, Any], tokenizer_dir: Path | None) -> Path:
    """Write one checkpoint directory atomically (call on rank 0 only); `write_model(dir)` writes the weights."""
    import yaml

    from phiforge.atomic import atomic_dir
    from phiforge.checkpoint import copy_tokenizer

    with atomic_dir(path) as tmp:
        write_model(tmp)
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            copy_tokenizer(tokenizer_dir, tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_trainer_state(path: Path) -> dict[str, Any]:
    # Our own file, holding NumPy RNG state tuples: not loadable with weights_only=True.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
