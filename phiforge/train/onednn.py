"""fp32 CPU matmuls through oneDNN instead of torch's default BLAS, for training.

Why: torch's CPU builds run fp32 `mm`/`addmm` on MKL, and MKL takes a slower code path on non-Intel CPUs: on
this project's 2-core AMD EPYC (Zen, AVX-512) MKL sgemm peaks near 200 GFLOP/s while oneDNN, which torch also
ships, reaches ~450 on the same shapes (bench/train.py prints both peaks). On Intel CPUs the two are close.
The numbers stay fp32: oneDNN accumulates in fp32 in its own blocking order (relative differences ~1e-6 from
MKL's, the size of any reordering); no reduced-precision mode (bf32/tf32) is involved.

`use_onednn_linears(model)` swaps the forward of every nn.Linear for `OneDNNLinear` (forward and both backward
matmuls on oneDNN) where the call is CPU fp32 without autocast, and plain F.linear otherwise; `matmul_nt` and
`grad_weight` serve the fused lm_head loss (train/parallel.py). Applied by `prepare_model` (the one place the
trainer changes how the model runs), off under torch.compile and FSDP, `cpu_matmul: torch` in a train config
turns it off.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F


def available() -> bool:
    """Whether torch has oneDNN (mkldnn) on this CPU and the linear op this module calls."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (m, k) @ b (n, k)^T + bias on oneDNN; a and b may be transposed views (no copies)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (m, k) @ b (n, k)^T."""
    return _linear(a, b)


def matmul_nn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (m, k) @ b (k, n)."""
    return _linear(a, b.t())


def grad_weight(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gy (M, N)^T @ x (M, K) -> (N, K), the weight gradient of y = x W^T. oneDNN is fastest when its first
    operand has the fewer rows (measured: 385-430 vs 145-245 GFLOP/s the other way round), so the product is
    formed as (x^T gy)^T when K < N."""
    if x.shape[1] < gy.shape[1]:
        return _linear(x.t(), gy.t()).t()
    return _linear(gy.t(), x.t())


def wanted(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether this matmul should run on oneDNN: CPU, fp32 on both sides, no autocast."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 \
        and not torch.is_autocast_enabled("cpu")


class OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with the forward and both backward matmuls on oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        ctx.save_for_backward(x2, w)
        ctx.has_bias = b is not None
        return _linear(x2, w, b).view(*x.shape[:-1], w.shape[0])  # (..., N)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x2, w = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])  # (M, N)
        gx = matmul_nn(g2, w).view(*gy.shape[:-1], w.shape[1]) if ctx.needs_input_grad[0] else None
        gw = grad_weight(g2, x2) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if wanted(x, self.weight):
        return OneDNNLinear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Route every nn.Linear of `model` through OneDNNLinear where wanted; returns how many were swapped."""
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear:
            mod.forward = types.MethodType(_forward, mod)
            n += 1
    return n
