"""The training loop: one function, `train(cfg)`, from one CPU to many GPUs under torchrun.

Per optimizer step: set the lr from the schedule; grad_accum micro-steps of forward + backward (gradients
synchronised across ranks only on the last); clip the global grad norm; check the loss is finite; AdamW step.
Every record goes to out/log.jsonl; checkpoints go to out/checkpoints/step-NNNNNN/ (see state.py).
Resuming restores model, optimizer, schedule, data cursor and RNG states, so the continued run computes the
same losses, bit for bit, as one that was never interrupted.

Fine-tuning examples (data tokenized with --format completion/chat) come as packed rows with a loss mask
(train/data.py ExampleLoader): a step's loss is the mean cross-entropy over all its completion tokens, whichever
micro-batch and rank they fall in, and the validation loss is the same mean over the held-out split's completion
tokens. With `lora_rank` only peft LoRA adapters train and are checkpointed (train/lora.py).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phiforge.errors import ConfigError, DataError, PhiforgeError
from phiforge.train.config import TrainConfig


class TrainingError(PhiforgeError):
    """Training cannot go on (a NaN/inf loss); the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    out_dir: Path
    log_path: Path
    checkpoint: Path | None  # the final checkpoint
    steps: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    losses: list[float] = field(default_factory=list)  # per-step train losses of this process's run
    merged: Path | None = None  # LoRA with merge: the base with the adapters folded in (HF layout)


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]


def build_model(cfg: TrainConfig, manifest: dict[str, Any]):
    """The Phi to train: loaded from a checkpoint directory (fine-tuning) or built from a preset/config file.

    From scratch, the vocabulary defaults to the tokenizer's size rounded up to 64 and BOS/EOS to its EOS."""
    from phiforge.checkpoint import load_checkpoint
    from phiforge.config import load_model_config, pad_vocab
    from phiforge.lm.spec import checkpoint_dir, parse_spec
    from phiforge.model import Phi

    spec = cfg.model
    is_ckpt = parse_spec(spec).kind in ("phiforge", "hf", "hub")  # else a preset or a config file: from scratch
    if is_ckpt:
        if cfg.model_overrides:
            raise ConfigError(f"model_overrides {sorted(cfg.model_overrides)} cannot change a checkpoint "
                              f"({spec}); they apply to models trained from scratch")
        path = checkpoint_dir(spec)
        if (path / "tokenizer.json").exists():  # fine-tuning data must speak the checkpoint's tokenizer
            from phiforge.tokenizer import load_tokenizer

            if load_tokenizer(path).hash() != manifest["tokenizer"]["sha256"]:
                raise DataError(f"{cfg.data} was tokenized with a different tokenizer than {path}'s; re-run "
                                f"`phiforge tokenize --tokenizer {path}`")
        phi = load_checkpoint(path, dtype=torch.float32)
        phi.train()
        return phi, True
    mc = load_model_config(spec)
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("vocab_size", pad_vocab(int(manifest["vocab_size"])))
    overrides.setdefault("eos_token_id", int(manifest["eos_token_id"]))
    overrides.setdefault("bos_token_id", int(manifest["eos_token_id"]))
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides and \
            mc.num_key_value_heads == mc.num_attention_heads:  # keep a multi-head preset multi-head
        overrides["num_key_value_heads"] = overrides["num_attention_heads"]
    mc = mc.replace(**overrides)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP shards each rank's copy)
    return Phi(mc), False


def _add_lora(phi: torch.nn.Module, cfg: TrainConfig, fine_tune: bool) -> Any:
    """Wrap a checkpoint's linears in peft LoRA adapters (train/lora.py); returns the LoraConfig."""
    from phiforge.lm.spec import checkpoint_dir
    from phiforge.train.lora import add_lora, lora_config

    if not fine_tune:
        raise ConfigError(f"lora_rank {cfg.lora_rank}: LoRA adapts a trained checkpoint; set model to a checkpoint "
                          f"directory (got {cfg.model!r})")
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    config = lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets,
                         base=checkpoint_dir(cfg.model).resolve())
    torch.manual_seed(cfg.seed)  # the same initial adapters on every rank
    add_lora(phi, config)
    return config


def train(cfg: TrainConfig, *, resume: bool | str | Path = False,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train (or fine-tune) per `cfg`; `resume=True` continues from the newest checkpoint in cfg.out (if any),
    a path continues from that checkpoint. Launch under torchrun for DDP / FSDP (cfg.fsdp).
    `on_step(record)` is called after every optimizer step with the step's metrics (e.g. a pipeline's UI)."""
    from phiforge.data.pack import read_manifest
    from phiforge.progress import progress
    from phiforge.train import state as st
    from phiforge.train.data import ExampleLoader, eval_batches, open_loader
    from phiforge.train.metrics import MetricsLog, peak_flops
    from phiforge.train.optim import LRSchedule, build_optimizer
    from phiforge.train.parallel import CausalLMLoss, init_distributed, prepare_model

    dist = init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out)
    manifest = read_manifest(cfg.data)
    if dist.is_main:  # staging of saves and prunes that a killed run left behind
        st.clean_stale(out)
    dist.barrier()

    # ---- resume point -------------------------------------------------------------------------------------
    ckpt: Path | None = None
    if resume:
        ckpt = Path(resume) if not isinstance(resume, bool) else st.latest_checkpoint(out)
        if ckpt is not None and not (ckpt / st.STATE_FILE).exists():
            raise ConfigError(f"{ckpt}: not a training checkpoint (no {st.STATE_FILE})")
    elif st.list_checkpoints(out):
        raise ConfigError(f"{out}: already holds checkpoints; pass --resume to continue that run, or choose "
                          f"another out directory")

    # ---- model and data -----------------------------------------------------------------------------------
    phi, fine_tune = build_model(cfg, manifest)
    mc = phi.config
    lora = _add_lora(phi, cfg, fine_tune) if cfg.lora_rank else None
    if cfg.seq_len > mc.max_position_embeddings:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's context (max_position_embeddings "
                          f"{mc.max_position_embeddings})")
    if int(manifest["vocab_size"]) > mc.vocab_size:
        raise ConfigError(f"the data's tokenizer has {manifest['vocab_size']} tokens but the model's vocab_size "
                          f"is {mc.vocab_size}")
    loader = open_loader(cfg.data, "train", cfg.seq_len, cfg.micro_batch, seed=cfg.seed, rank=dist.rank,
                         world_size=dist.world_size)
    val_loader = open_loader(cfg.data, "val", cfg.seq_len, cfg.micro_batch, rank=dist.rank,
                             world_size=dist.world_size, shuffle=False)
    packed = isinstance(loader, ExampleLoader)
    per_step = cfg.micro_batch * dist.world_size * cfg.grad_accum  # sequences per optimizer step
    if loader.n_chunks < per_step:
        what = f"{loader.packing_stats()['examples']:,} examples packed" if packed else f"{len(loader.stream):,} tokens"
        raise DataError(f"{cfg.data}: the train split has {what} = {loader.n_chunks} "
                        f"sequences of {cfg.seq_len}, fewer than one global batch of {per_step} sequences "
                        f"(micro_batch {cfg.micro_batch} x grad_accum {cfg.grad_accum} x {dist.world_size} "
                        f"process(es)); use more data or a smaller batch / seq_len")
    total_steps = cfg.total_steps(dist.world_size)
    tokens_per_step = per_step * cfg.seq_len
    if ckpt is not None:  # weights before wrapping: FSDP then shards the loaded tensors
        from phiforge.checkpoint import load_checkpoint
        from phiforge.train.lora import is_adapter_checkpoint, load_adapter

        if is_adapter_checkpoint(ckpt) != (lora is not None):
            raise ConfigError(f"{ckpt}: a {'LoRA' if is_adapter_checkpoint(ckpt) else 'full'} checkpoint; resume it "
                              f"with the lora_rank it was trained with")
        if lora is not None:
            load_adapter(phi, ckpt)
        else:
            phi.load_state_dict(load_checkpoint(ckpt, dtype=torch.float32).state_dict())
    phi.to(dist.device)
    phi.rotary.reset(dist.device)
    phi.train()
    model = prepare_model(CausalLMLoss(phi, cfg.loss_chunk), cfg, dist)
    optimizer = build_optimizer(model, cfg, sharded=cfg.fsdp and dist.enabled)
    schedule = LRSchedule(cfg, total_steps)
    amp = _autocast_dtype(cfg, dist.device)
    step = 0
    if ckpt is not None:
        ts = st.load_trainer_state(ckpt)
        if bool(ts.get("fsdp")) != bool(cfg.fsdp and dist.enabled):
            raise ConfigError(f"{ckpt}: saved {'with' if ts.get('fsdp') else 'without'} FSDP; resume it the same "
                              f"way (the optimizer state layouts differ)")
        if ts.get("tokenizer_sha256") not in (None, manifest["tokenizer"]["sha256"]):
            raise DataError(f"cannot resume {ckpt}: it was trained on data from another tokenizer than "
                            f"{cfg.data}'s")
        _load_optimizer(model, optimizer, ts["optimizer"], cfg.fsdp and dist.enabled)
        schedule.load_state_dict(ts["scheduler"])
        loader.load_state_dict(ts["data"])
        rngs = ts["rng"]
        st.set_rng_state(rngs[dist.rank] if len(rngs) == dist.world_size else rngs[0])
        step = int(ts["step"])
        if step >= total_steps:  # said before the log is touched: a finished run's log.jsonl stays as it is
            raise ConfigError(f"{ckpt}: this run already finished (step {step} of {total_steps}); to train "
                              f"further raise max_steps (e.g. --set max_steps={2 * total_steps} --resume), or "
                              f"train into another out directory")
    elif dist.enabled or fine_tune:
        # Per-rank dropout masks; and a fine-tune's (loading a checkpoint seeds nothing) repeat run for run.
        torch.manual_seed(cfg.seed + dist.rank)

    tokdir = Path(cfg.data) / manifest["tokenizer"]["path"]
    log = MetricsLog(out / "log.jsonl", tensorboard_dir=out / "tensorboard" if cfg.tensorboard else None,
                     truncate_after=step if ckpt is not None else None) if dist.is_main else None
    peak = peak_flops(dist.device, amp or torch.float32)
    flops_tok = mc.flops_per_token(cfg.seq_len)
    peak_refreshed = False
    if log is not None and ckpt is None:
        log.write({"type": "start", "step": 0, "params": phi.num_params(), "flops_per_token": flops_tok,
                   "peak_flops": peak, "world_size": dist.world_size, "total_steps": total_steps,
                   "tokens_per_step": tokens_per_step, "fine_tune": fine_tune, "config": cfg.to_dict(),
                   "trainable_params": sum(p.numel() for p in phi.parameters() if p.requires_grad),
                   **({"packing": loader.packing_stats()} if packed else {})})
    elif log is not None:
        log.write({"type": "resume", "step": step, "checkpoint": str(ckpt)})

    def autocast():
        return torch.autocast(dist.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def evaluate() -> float | None:
        batches = eval_batches(val_loader, cfg.eval_batches)
        if not batches:
            return None
        model.eval()
        total = torch.zeros((), device=dist.device)
        count = torch.zeros((), device=dist.device)  # completion tokens (packed examples)
        with torch.no_grad(), autocast():
            for batch in batches:
                tensors = [t.to(dist.device) for t in batch]
                if packed:  # a sum over completion tokens: the mean is over all of them, on every rank
                    total += model(*tensors, denom=1.0).float()
                    count += batch.loss_mask.sum()
                else:
                    total += model(*tensors).float()
        model.train()
        if packed:
            return float(dist.mean(total) / dist.mean(count).clamp(min=1))
        return float(dist.mean(total / len(batches)))

    last_saved: Path | None = ckpt

    def save() -> Path:
        nonlocal last_saved
        path = st.step_dir(out, step)
        msd, osd = _gather_state(model, optimizer, cfg.fsdp and dist.enabled)
        rngs = _gather_rng(dist)
        if dist.is_main:
            from phiforge.checkpoint import save_model_files
            from phiforge.model import init_on_meta

            def write_model(d: Path) -> None:
                if lora is not None:  # the adapters only (from the gathered state under FSDP)
                    from phiforge.train.lora import save_adapter

                    save_adapter(d, msd if msd is not None else phi.state_dict(), lora)
                elif msd is None:
                    save_model_files(phi, d)
                else:  # a full state dict gathered from FSDP shards: wrap it in a Phi for save_model_files
                    target = init_on_meta(mc)
                    target.load_state_dict(msd, assign=True)
                    save_model_files(target, d)

            trainer_state = {"step": step, "tokens": step * tokens_per_step, "optimizer": osd,
                             "scheduler": schedule.state_dict(), "data": loader.state_dict(), "rng": rngs,
                             "world_size": dist.world_size, "fsdp": bool(cfg.fsdp and dist.enabled),
                             "tokenizer_sha256": manifest["tokenizer"]["sha256"]}
            st.save_training_checkpoint(path, write_model, trainer_state, cfg.to_dict(), tokdir)
            st.prune_checkpoints(out, cfg.keep_last)
        dist.barrier()
        last_saved = path
        return path

    bar = progress(total=total_steps, desc="train", unit="step", initial=step) if dist.is_main else None
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    train_loss = val_loss = None
    merged: Path | None = None
    last_eval_step = -1
    t_run = time.perf_counter()
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            lr = schedule.apply(optimizer)
            batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
            loss_mean, grad_norm = forward_backward(model, params, batches, cfg.grad_clip, dist.device, autocast,
                                                    dist=dist)
            train_loss = float(dist.mean(loss_mean))
            if not math.isfinite(train_loss):
                msg = (f"loss is {train_loss} at step {step + 1}; training stopped before the optimizer step. "
                       f"Last good checkpoint: {last_saved or 'none (no checkpoint was saved yet)'}")
                if log is not None:
                    log.write({"type": "error", "step": step + 1, "message": msg})
                raise TrainingError(msg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            schedule.step = step
            losses.append(train_loss)
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt
            mfu = tps * flops_tok / (peak * dist.world_size) if peak else None
            if mfu is not None and mfu > 1.0 and dist.device.type == "cpu" and not peak_refreshed:
                from phiforge.train.metrics import cpu_peak_flops

                peak_refreshed = True  # the cached CPU peak was measured under load: measure again, once
                peak = cpu_peak_flops(amp or torch.float32, refresh=True)
                mfu = tps * flops_tok / (peak * dist.world_size)
            logged = step % cfg.log_every == 0 or step == total_steps  # the same on every rank
            loss_tokens = None
            if packed and logged:  # completion tokens with loss in this step, over all ranks (a collective)
                local = torch.tensor(float(sum(int(b.loss_mask.sum()) for b in batches)), device=dist.device)
                loss_tokens = round(float(dist.mean(local)) * dist.world_size)
            if log is not None and logged:
                log.write({"type": "train", "step": step, "loss": train_loss, "lr": lr,
                           "grad_norm": float(grad_norm) if grad_norm is not None else None,
                           "tokens": step * tokens_per_step, "tokens_per_s": tps, "mfu": mfu, "step_s": dt,
                           **({"loss_tokens": loss_tokens} if packed else {})})
            if on_step is not None:
                on_step({"step": step, "loss": train_loss, "lr": lr, "tokens_per_s": tps, "mfu": mfu})
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {train_loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s"
                                    + (f" mfu {100 * mfu:.1f}%" if mfu is not None else ""))
            if cfg.eval_every and step % cfg.eval_every == 0:
                val_loss = evaluate()
                last_eval_step = step
                if log is not None and val_loss is not None:
                    log.write({"type": "eval", "step": step, "val_loss": val_loss})
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save()
        if last_eval_step != step:
            val_loss = evaluate()
            if log is not None and val_loss is not None:
                log.write({"type": "eval", "step": step, "val_loss": val_loss})
        final = last_saved if last_saved is not None and last_saved.name == st.step_dir(out, step).name \
            else save()
        if cfg.merge and dist.is_main:
            from phiforge.train.lora import merge_adapter_checkpoint

            merged = merge_adapter_checkpoint(final, out / "merged")
            if log is not None:
                log.write({"type": "merged", "step": step, "path": str(merged)})
        dist.barrier()
        if log is not None:
            log.write({"type": "end", "step": step, "train_loss": train_loss, "val_loss": val_loss,
                       "checkpoint": str(final), "seconds": time.perf_counter() - t_run})
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return TrainResult(out_dir=out, log_path=out / "log.jsonl", checkpoint=final, steps=step,
                       tokens=step * tokens_per_step, train_loss=train_loss, val_loss=val_loss, losses=losses,
                       merged=merged)


def forward_backward(model: torch.nn.Module, params: list[torch.Tensor],
                     batches: list[tuple[torch.Tensor, ...]], grad_clip: float, device: torch.device,
                     autocast: Callable[[], Any], dist: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of one optimizer step: forward + backward over the micro-batches (synchronised across ranks on
    the last only), then clip. Returns (this rank's share of the step's loss, total grad norm or None): the
    mean loss is its mean over ranks (`dist`: parallel.Dist). The optimizer step is the caller's, after it has
    checked the loss.

    Token chunks (inputs, targets): every micro-batch has the same number of targets, so the step's loss is the
    mean of the micro-batches' means. Packed examples (data.Batch): micro-batches and ranks hold different
    numbers of completion tokens, so each micro-batch's loss is its sum over them divided by N / world (N: their
    count over the whole step, all ranks); DDP / FSDP average the gradients over ranks, which makes the step's
    gradient that of the mean over all N completion tokens, as one big batch would give."""
    from phiforge.train.data import Batch
    from phiforge.train.parallel import grad_sync

    denom = None
    if isinstance(batches[0], Batch):
        count = torch.stack([b.loss_mask.sum() for b in batches]).sum().to(device, torch.float64)
        denom = float(dist.mean(count) if dist is not None else count) or 1.0  # N / world
    loss_sum = torch.zeros((), device=device)
    for m, batch in enumerate(batches):
        tensors = [t.to(device, non_blocking=True) if t is not None else None for t in batch]
        with grad_sync(model, m == len(batches) - 1):
            with autocast():
                loss = model(*tensors) if denom is None else model(*tensors, denom=denom)
            (loss / len(batches) if denom is None else loss).backward()
        loss_sum += loss.detach().float()
    grad_norm = None
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
    return (loss_sum / len(batches) if denom is None else loss_sum), grad_norm


def _gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool):
    """(full model state dict or None, optimizer state dict): FSDP gathers full tensors to CPU on rank 0."""
    if not fsdp:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    msd = {k.removeprefix("phi."): v for k, v in msd.items()}  # CausalLMLoss.phi -> Phi's own names
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    return msd, osd


def _load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, osd: dict[str, Any],
                    fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def _gather_rng(dist) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (each rank restores its own on resume)."""
    from phiforge.train.state import rng_state

    mine = rng_state()
    if not dist.enabled:
        return [mine]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, mine)
    return out
