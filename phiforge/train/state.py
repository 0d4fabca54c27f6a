"""Training checkpoints: HF-layout model + tokenizer + trainer_state.pt + train_config.yaml, atomically.

    out/checkpoints/step-000123/
        config.json, model.safetensors     the model (loads with phiforge or transformers); under LoRA instead
                                           adapter_config.json + adapter_model.safetensors (train/lora.py)
        tokenizer.json, ...                copied from the token shards' tokenizer
        trainer_state.pt                   optimizer, schedule, data position, RNG states of every rank
        train_config.yaml                  the TrainConfig of the run

A directory is built under a temporary name and renamed when complete, so a run killed mid-save never leaves a
checkpoint that looks whole; `latest_checkpoint` therefore only ever finds complete ones. Pruning renames a
checkpoint out of the way before deleting it, so a kill mid-prune leaves no half-deleted step-*; `clean_stale`
removes what killed saves and prunes left, when training starts again on the same out directory.
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
    """Delete all but the newest `keep_last` checkpoints (0 keeps everything); each is renamed to a staging
    name first, so a kill mid-delete leaves litter that `clean_stale` removes, never a half checkpoint."""
    from phiforge.atomic import staging_name

    if keep_last <= 0:
        return
    for p in list_checkpoints(out)[:-keep_last]:
        gone = staging_name(p, "prune")
        p.rename(gone)
        shutil.rmtree(gone, ignore_errors=True)


def is_complete(path: Path) -> bool:
    """Whether a step directory holds a whole checkpoint: trainer state, a config and weights (full or LoRA)."""
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    return STATE_FILE in names and bool(names & {"config.json", "adapter_config.json"}) and any(
        n.endswith(".safetensors") for n in names)


def clean_stale(out: Path) -> list[Path]:
    """Remove what killed runs left under out/checkpoints: staging directories of saves and prunes, and step
    directories older than the newest complete checkpoint that are not whole (a prune killed mid-delete by an
    earlier version). Call on rank 0 before training starts. Returns what was removed."""
    from phiforge.atomic import remove_stale

    root = out / "checkpoints"
    removed = remove_stale(root, "step-*")
    complete = [p for p in list_checkpoints(out) if is_complete(p)]
    if complete:
        newest = int(_STEP_DIR.match(complete[-1].name).group(1))
        for p in sorted(root.iterdir()):
            m = _STEP_DIR.match(p.name)
            if m and int(m.group(1)) < newest and p.is_dir() and not is_complete(p):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


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
    """A checkpoint's trainer state; a damaged file is a CheckpointError naming it."""
    from phiforge.errors import CheckpointError

    try:
        # Our own file, holding NumPy RNG state tuples: not loadable with weights_only=True.
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a cut zip, garbage bytes: one line naming the file
        raise CheckpointError(f"{path / STATE_FILE}: damaged trainer state ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:120]}); resume from an earlier checkpoint "
                              f"(--resume DIR)") from None
    keys = ("step", "optimizer", "scheduler", "data", "rng")
    if not isinstance(state, dict) or not all(k in state for k in keys):
        raise CheckpointError(f"{path / STATE_FILE}: not a trainer state (needs {', '.join(keys)}); resume from "
                              f"an earlier checkpoint (--resume DIR)")
    return state
