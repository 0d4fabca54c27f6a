"""TrainConfig: every knob of a training run in one typed dataclass, read from YAML plus `--set` overrides.

No torch import here (the CLI's --help and the run planner read configs without building anything).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from phiforge.configio import Source, check_keys, load_yaml, read_dataclass
from phiforge.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the shipped recipes (tiny, phi-1.5, phi-2)
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """A training run. Batch sizes are in sequences: global batch = micro_batch x grad_accum x world size."""

    # what to train
    model: str = "tiny"  # preset name | ModelConfig YAML/JSON file | checkpoint directory (fine-tune)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (from-scratch only)
    data: str = "data/tokens"  # a directory made by `phiforge tokenize`
    out: str = "runs/train"  # log.jsonl, checkpoints/step-NNNNNN/, tensorboard/
    # batch and length
    seq_len: int = 256
    micro_batch: int = 8  # sequences per process per forward/backward
    grad_accum: int = 1
    max_steps: int | None = None  # optimizer steps; or give max_tokens
    max_tokens: int | None = None
    # optimizer (AdamW; no weight decay on norms, biases and embeddings)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100  # steps of linear warmup from 0
    schedule: str = "cosine"  # after warmup: cosine | linear decay to min_lr at the last step, or constant
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # evaluation, checkpoints, logging
    eval_every: int = 100  # steps; 0 = only at the end
    eval_batches: int = 10  # micro-batches (per process) of validation data per evaluation
    save_every: int = 500  # steps; 0 = only at the end
    keep_last: int = 3  # checkpoints kept (older ones are deleted); 0 = keep all
    log_every: int = 1  # steps between JSONL train records
    tensorboard: bool = False
    # numerics and execution
    seed: int = 0
    dtype: str = "auto"  # auto = fp32 on CPU, bf16 autocast on GPU; fp32 | bf16 | fp16 (autocast)
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 fully_shard under torchrun (else DDP when world size > 1)
    cpu_matmul: str = "auto"  # auto = fp32 CPU matmuls on oneDNN where torch has it (train/onednn.py); torch
    threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    loss_chunk: int = 0  # tokens per chunk of the chunked cross-entropy; 0 = auto (chunk only huge logits)
    device: str = "auto"  # auto | cpu | cuda
    # LoRA (peft; train/lora.py): adapters on a checkpoint's linears, everything else frozen
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0  # adapter scale alpha / rank
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,dense,fc1,fc2"  # comma-separated
    merge: bool = False  # LoRA: also write out/merged/, the base with the adapters folded in (HF layout)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def tokens_per_micro(self) -> int:
        return self.micro_batch * self.seq_len

    def validate(self) -> None:
        """ConfigError naming the field for values that cannot work."""
        for name in ("seq_len", "micro_batch", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"train config: {name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("train config: set max_steps or max_tokens")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train config: max_steps must be >= 1, got {self.max_steps}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train config: schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.cpu_matmul not in ("auto", "torch"):
            raise ConfigError(f"train config: cpu_matmul {self.cpu_matmul!r} is not one of auto, torch")
        if self.dtype not in DTYPES:
            raise ConfigError(f"train config: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train config: device {self.device!r} is not one of auto, cpu, cuda")
        if len(self.betas) != 2:
            raise ConfigError(f"train config: betas must be two numbers, got {self.betas!r}")
        if not (self.lr > 0 and self.min_lr >= 0 and self.eps > 0 and self.weight_decay >= 0):
            raise ConfigError("train config: lr must be > 0; min_lr, weight_decay >= 0; eps > 0")
        for name in ("warmup", "eval_every", "eval_batches", "save_every", "keep_last", "grad_clip", "loss_chunk"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train config: {name} must be >= 0, got {getattr(self, name)!r}")
        if self.log_every < 1:
            raise ConfigError(f"train config: log_every must be >= 1, got {self.log_every}")
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError("train config: lora_rank must be >= 0, lora_alpha > 0, lora_dropout in [0, 1)")
        if self.merge and not self.lora_rank:
            raise ConfigError("train config: merge folds LoRA adapters into the base model; set lora_rank "
                              "(--lora-rank R) too")

    def total_steps(self, world_size: int = 1) -> int:
        """max_steps, or max_tokens divided by the tokens of one optimizer step (rounded up)."""
        if self.max_steps is not None:
            return self.max_steps
        per_step = self.tokens_per_micro * self.grad_accum * world_size
        return max(1, -(-int(self.max_tokens) // per_step))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        return from_dict({**self.to_dict(), **changes})


def from_dict(d: dict[str, Any], source: str | Source = "train config") -> TrainConfig:
    """Build a TrainConfig (values coerced to the field types); unknown keys and bad values are errors naming
    the key and the source (FILE:LINE when `source` is a file read by `phiforge.configio.load_yaml`)."""
    src = source if isinstance(source, Source) else Source(source)
    return read_dataclass(TrainConfig, d, src, what="train config")


def resolve_config_path(spec: str | os.PathLike) -> Path:
    """A YAML path, or the name of a shipped recipe (`tiny`, `phi-1.5`, `phi-2` -> configs/<name>.yaml)."""
    p = Path(spec)
    if p.exists():
        return p
    shipped = CONFIG_DIR / f"{spec}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"{spec}: no such config file (shipped recipes: {', '.join(names) or 'none'})")


def parse_override(item: str) -> tuple[str, Any]:
    """'lr=3e-4' -> ('lr', 0.0003); the value is parsed as YAML ('model_overrides.num_hidden_layers=2' nests)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip().removeprefix("train.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML reads 3e-4 as a string (no dot); numbers written that way are common
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in "eE.") and not value.isalpha() else value
    return key, value


def load_train_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                      base: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML recipe (or a shipped name), apply KEY=VALUE overrides; unknown keys name the key and file:line."""

    src = Source("train config", dict(base or {}))
    if path is not None:
        loaded = load_yaml(resolve_config_path(path), what="train config keys")
        check_keys(loaded.data, [f.name for f in fields(TrainConfig)], loaded, what="train config")
        src = Source(loaded.name, {**src.data, **loaded.data}, loaded.lines)
    known = {f.name for f in fields(TrainConfig)}
    over: dict[str, Any] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        top, _, rest = key.partition(".")
        if top not in known:
            raise ConfigError(f"override {item!r}: unknown train config key {top!r} (known: {', '.join(sorted(known))})")
        if rest:
            if top != "model_overrides":
                raise ConfigError(f"override {item!r}: {top!r} has no sub-keys")
            over[top] = {**(over.get(top) or src.data.get(top) or {}), rest: value}
        else:
            over[top] = value
    if over:  # overridden keys lose their file lines: an error in one names the overrides
        src = Source(src.name, {**src.data, **over}, {p: n for p, n in src.lines.items() if p[0] not in over},
                     "overrides")
    return from_dict(src.data, src)
