"""Everything that turns a single-device Phi into what the trainer runs, applied in ONE place.

The model file (phiforge/model.py) knows nothing of distribution; here, in this order (torchtitan's order):

    1. activation checkpointing  each block's forward recomputed in backward (memory for compute)
    2. torch.compile             each block compiled on its own (fast to compile, one graph reused L times)
    3. FSDP2 or DDP              fully_shard every block and then the root; or wrap the root in DDP

Checkpointing wraps `forward` and compile uses `Module.compile()`, both in place, so parameter names stay
HF-compatible (no `_orig_mod.` or `_checkpoint_wrapped_module.` prefixes) and checkpoints load anywhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge.model import Phi
from phiforge.train.config import TrainConfig


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor across ranks (itself when single-process)."""
        if self.enabled:
            import torch.distributed as dist

            value = value.detach().clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, ...): NCCL on GPUs, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


class CausalLMLoss(nn.Module):
    """Phi + next-token loss as one module, so DDP / FSDP hooks see the whole step in `forward`.

    The loss is computed from the final hidden states by `lm_loss`, `chunk` tokens at a time (0 = auto), so
    (B*T, vocab) fp32 logits never exist at once.

    Packed fine-tuning examples (train/data.py's Batch) also pass `loss_mask`, `position_ids` and `segment_ids`:
    attention stays within each example (a block-diagonal causal mask, `packed_attention_mask`), rotary positions
    restart with each example, and only the hidden states of masked targets reach the fused loss head (the rest
    cost no lm_head matmul). The result is then sum(CE over masked targets) / `denom`, so that the caller can
    make one optimizer step's loss the mean over all its completion tokens, across micro-batches and ranks."""

    def __init__(self, phi: Phi, chunk: int = 0) -> None:
        super().__init__()
        self.phi = phi
        self.chunk = chunk
        self.onednn = False  # the loss head's fp32 CPU matmuls on oneDNN (set by prepare_model)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None, *,
                denom: float | None = None) -> torch.Tensor:
        mask = packed_attention_mask(segment_ids) if segment_ids is not None else None
        h = self.phi.hidden_states(inputs, attention_mask=mask, position_ids=position_ids)  # (B, T, d)
        if loss_mask is not None:
            keep = loss_mask.reshape(-1).nonzero().squeeze(1)  # (n,) the targets that count
            h, targets = h.reshape(-1, h.shape[-1]).index_select(0, keep), targets.reshape(-1)[keep]  # (n, d), (n,)
        return lm_loss(h, self.phi.lm_head, targets, self.chunk, onednn=self.onednn, denom=denom)


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) example ids -> boolean (B, 1, T, T): query t sees key s iff s <= t and both are in one example.

    SDPA with this mask rather than FlexAttention, by measurement (torch 2.13, a busy 2-core CPU): FlexAttention
    has no CPU backward, and SDPA with the mask costs what its plain causal path does (B 8, 4 heads x 32, T 256,
    forward + backward: 24 vs 25 ms)."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()  # (T, T)
    return ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]


def lm_loss(h: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int = 0, *,
            onednn: bool = False, denom: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of lm_head(h) against targets, fused and chunked over tokens (or the sum
    divided by `denom` when given).

    `chunk` tokens at a time: logits (chunk, vocab) in fp32, their log-sum-exp and loss, and, when training, the
    gradients w.r.t. h, W and b right away (the loss is a scalar, so d loss / d logits = softmax - onehot is
    known in the forward pass). The full (B*T, vocab) fp32 logits never exist, nothing is recomputed, and each
    chunk stays in cache while it is used five times. chunk 0 = auto (about 16 MB of logits per chunk).
    `onednn`: fp32 CPU matmuls on oneDNN (train/onednn.py) when training."""
    d = h.shape[-1]
    h, t = h.reshape(-1, d), targets.reshape(-1)  # (N, d), (N,)
    vocab = head.weight.shape[0]
    if chunk <= 0:
        chunk = min(4096, max(128, (1 << 22) // vocab))
    denom = float(t.shape[0]) if denom is None else float(denom)
    if torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
        return _LinearCrossEntropy.apply(h, head.weight, head.bias, t, chunk, onednn, denom)
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, t.shape[0], chunk):
        total += F.cross_entropy(head(h[i:i + chunk]).float(), t[i:i + chunk], reduction="sum")
    return total / denom


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = sum CE(h @ W.T + b, t) / denom, computing d loss/d (h, W, b) chunk by chunk inside forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor,
                chunk: int, onednn: bool = False, denom: float = 1.0) -> torch.Tensor:
        from phiforge.train import onednn as dnn

        dev = h.device.type
        # Under autocast the matmuls run in the autocast dtype; softmax / loss / accumulation stay in fp32.
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w.dtype
        n = t.shape[0]
        fast = onednn and dnn.wanted(h, w)
        # A frozen head (LoRA) needs no (V, d) weight gradient: skipping it saves a third of the head's matmuls.
        want_w, want_b = ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]
        with torch.autocast(dev, enabled=False):
            wd = w.to(dt)
            grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
            grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if want_b else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for i in range(0, n, chunk):
                hc, tc = h[i:i + chunk].to(dt), t[i:i + chunk]  # (c, d), (c,)
                logits = (dnn.matmul_nt(hc, wd) if fast else hc @ wd.t()).float()  # (c, V)
                if b is not None:
                    logits += b.float()
                lse = torch.logsumexp(logits, dim=-1)  # (c,)
                total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
                # d(sum CE)/d logits = softmax - onehot, built in place in the logits buffer.
                p = logits.sub_(lse[:, None]).exp_()
                p[torch.arange(p.shape[0], device=p.device), tc] -= 1.0
                pd = p.to(dt)
                grad_h[i:i + chunk] = (dnn.matmul_nn(pd, wd) if fast else pd @ wd).to(h.dtype)  # (c, d)
                if grad_w is not None and fast:
                    grad_w += dnn.grad_weight(pd, hc)  # (V, d)
                elif grad_w is not None and dt == torch.float32:
                    grad_w.addmm_(pd.t(), hc)  # (V, d)
                elif grad_w is not None:
                    grad_w += (pd.t() @ hc).float()
                if grad_b is not None:
                    grad_b += p.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.denom, ctx.dtypes = denom, (w.dtype, b.dtype if b is not None else None)
        return total / denom

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        s = g / ctx.denom  # the loss is a sum over tokens divided by denom
        gw = (grad_w * s).to(ctx.dtypes[0]) if grad_w is not None else None
        gb = (grad_b * s).to(ctx.dtypes[1]) if grad_b is not None else None
        return grad_h * s.to(grad_h.dtype), gw, gb, None, None, None, None


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def prepare_model(model: CausalLMLoss, cfg: TrainConfig, dist: Dist) -> nn.Module:
    """Apply the CPU matmul backend, activation checkpointing, compile and FSDP2/DDP (in that order) and
    return what to train."""
    blocks = list(model.phi.model.layers)
    # 0. fp32 CPU matmuls on oneDNN (~2x MKL's rate on AMD CPUs; train/onednn.py). Each call checks for CPU
    #    fp32 without autocast, so GPU and bf16 runs are untouched; skipped where torch.compile or FSDP2 own the
    #    linears' execution.
    if cfg.cpu_matmul == "auto" and not cfg.compile and not (dist.enabled and cfg.fsdp):
        from phiforge.train import onednn

        if onednn.available():
            onednn.use_onednn_linears(model.phi)
            model.onednn = True
    # 1. Activation checkpointing: keep only each block's input; recompute its insides during backward.
    if cfg.activation_checkpointing:
        for block in blocks:
            block.forward = _checkpointed(block.forward)
    # 2. Compile per block: L identical blocks share one compiled graph; the loss head compiles separately.
    if cfg.compile:
        for block in blocks:
            block.compile()
    # 3. Data parallelism.
    if not dist.enabled:
        return model
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        for block in blocks:  # each block its own all-gather unit: at most one block unsharded at a time
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, lm_head
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step of an accumulation."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP) and not sync:
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2 module
        model.set_requires_gradient_sync(sync)
        yield
    else:
        yield
