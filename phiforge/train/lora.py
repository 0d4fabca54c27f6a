"""LoRA fine-tuning through peft: adapters on a Phi's linear layers, adapter-only checkpoints, merging.

`add_lora` injects peft's LoRA layers (`peft.inject_adapter_in_model`, which works on any nn.Module) into the
q/k/v/dense/fc1/fc2 projections of every block and freezes everything else: y = W x + (alpha / r) B A x, with B
starting at zero so training starts from the base model's function. Each wrapped projection keeps the original
nn.Linear as its `base_layer`, so on the CPU train/onednn.py's swap (applied later, by prepare_model) still
routes the frozen base matmuls and the adapters' small ones through oneDNN.

A LoRA checkpoint holds only the adapters, in PEFT's own layout (adapter_config.json, whose
base_model_name_or_path names the base checkpoint, and adapter_model.safetensors with keys
`base_model.model.<HF parameter name>.lora_{A,B}.weight`), so `peft.PeftModel.from_pretrained` loads it onto a
transformers PhiForCausalLM as well. `merge_adapter_checkpoint` folds the adapters into the base weights and
writes a plain HF-layout checkpoint that transformers and every phiforge command load.

Memory (phi-2, 2.78B parameters, r=16 on all six projections: 23.6M adapter parameters): the frozen base in
fp32 (as the trainer holds it) is 10.4 GiB; adapters with their gradients and AdamW state 0.35 GiB; activations
of one 2048-token sequence 17 GiB under bf16 autocast, ~1.2 GiB with activation_checkpointing (measured by
counting the tensors autograd saves; `phiforge train --help` has the whole account).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from phiforge.errors import CheckpointError, ConfigError

TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")  # Phi's linears (HF names), lm_head excluded
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the base model's own parameter names
ADAPTER = "default"  # peft's adapter name inside the modules (absent from saved keys, as in PEFT's files)


def lora_config(rank: int, alpha: float, dropout: float, targets: list[str] | tuple[str, ...],
                base: str | os.PathLike | None = None) -> Any:
    """A peft LoraConfig for Phi's projections (task CAUSAL_LM, no bias training)."""
    from peft import LoraConfig

    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"lora_targets: {', '.join(unknown)} not among Phi's linear layers ({', '.join(TARGETS)})")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                      task_type="CAUSAL_LM", base_model_name_or_path=str(base) if base is not None else None)


def add_lora(phi: torch.nn.Module, config: Any) -> torch.nn.Module:
    """Wrap the target linears of `phi` in LoRA layers, in place; only the adapters require grad afterwards."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, phi, adapter_name=ADAPTER)
    return phi


def adapter_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a LoRA-wrapped model's (full) state dict, under PEFT's saved key names."""
    out = {}
    for k, v in state_dict.items():
        if ".lora_A." in k or ".lora_B." in k:
            out[PREFIX + k.replace(f".{ADAPTER}.", ".")] = v.detach().to("cpu").contiguous()
    return out


def save_adapter(out_dir: Path, state_dict: dict[str, torch.Tensor], config: Any) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing directory."""
    from safetensors.torch import save_file

    config.save_pretrained(str(out_dir))
    save_file(adapter_state_dict(state_dict), str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def is_adapter_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def load_adapter(phi: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a LoRA checkpoint's adapter weights into a model wrapped by `add_lora` with the same settings."""
    from safetensors.torch import load_file

    f = Path(path) / ADAPTER_WEIGHTS
    if not f.exists():
        raise CheckpointError(f"{f}: missing (a LoRA checkpoint holds adapter_config.json and this file)")
    saved = load_file(str(f))
    wanted = {k for k in phi.state_dict() if ".lora_A." in k or ".lora_B." in k}
    sd = {}
    for k, v in saved.items():
        name = k.removeprefix(PREFIX).replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.",
                                                                                       f".lora_B.{ADAPTER}.")
        if name not in wanted:
            raise CheckpointError(f"{f}: tensor {k!r} matches no LoRA layer of this model (other targets?)")
        sd[name] = v
    missing = sorted(wanted - set(sd))
    if missing:
        raise CheckpointError(f"{f}: no tensor for {missing[0]} ({len(missing)} LoRA tensors missing)")
    phi.load_state_dict(sd, strict=False)


def merge_lora(phi: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA layer into its base weight (W += alpha/r B A) and put the plain nn.Linear back, in place."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for name, module in list(phi.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge(adapter_names=[ADAPTER])
                parent, _, attr = name.rpartition(".")
                setattr(phi.get_submodule(parent), attr, module.get_base_layer())
    for p in phi.parameters():
        p.requires_grad_(True)
    return phi


def load_lora_model(adapter_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The base checkpoint named by a LoRA checkpoint's adapter_config.json, with its adapters loaded."""
    from peft import LoraConfig

    from phiforge.checkpoint import load_checkpoint

    config = LoraConfig.from_pretrained(str(adapter_dir))
    base = config.base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: base_model_name_or_path {base!r} is not a "
                              f"checkpoint directory; the adapters need their base model")
    phi = load_checkpoint(base, dtype=dtype)
    add_lora(phi, config)
    load_adapter(phi, adapter_dir)
    return phi


def merge_adapter_checkpoint(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Base + adapters -> a plain HF-layout checkpoint in `out_dir` (the adapter checkpoint's tokenizer too)."""
    from phiforge.checkpoint import save_checkpoint

    phi = merge_lora(load_lora_model(adapter_dir))
    tok = Path(adapter_dir) if (Path(adapter_dir) / "tokenizer.json").exists() else None
    return save_checkpoint(phi, out_dir, tokenizer=tok)
