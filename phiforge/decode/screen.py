"""Greedy decoding's lm_head: the argmax of the logits without reading all of the weight (ArgmaxScreen)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge import kernels
from phiforge.decode.linear import mkldnn_bf16


class ArgmaxScreen:
    """argmax(h @ W^T + b) per row of h, reading a low-precision copy of W instead of all of it.

    A cheap pass gives approximations y_n of every logit with a rigorous bound |y_n - r_n| <= B (B over all
    rows n at once; r_n are the logits the full lm_head computes, in its dtype). The argmax n* of r satisfies
    y_n* >= max(y) - 2B, so only rows within 2B of the top can win: their exact logits are computed from W (a few
    rows, usually < 20 of 51,200) and argmax'd, lowest id first on ties like a full argmax. When too many rows
    are candidates (flat logits, inf/NaN) the caller computes all the logits instead.

    Copies, by what exists (both halve the bytes or better):
    - "int8": per-row int8 codes read by the native kernel (phiforge/kernels), for fp32 and bf16 weights. With
      d_n = w_n - s_n q_n (kept: its 2-norm), x~ the kernel's int16 rounding of h and a_n = s_n sum_k |q_nk|:
      |h.w_n - y_n| <= |h|_2 |d_n|_2 + 0.51 max|h| / 32767 a_n + float error (< 2^-20 (max|h| a_n + |b_n|));
      the full lm_head accumulates in fp32 (<= (K + 2) 2^-24 |h|_2 |w_n|_2) and rounds its output to its dtype
      (unit roundoff u: 2^-8 bf16, 2^-24 fp32).
    - "bf16" (fp32 weights, no C compiler, a CPU with oneDNN's bf16 path): oneDNN with bf16 h and W, fp32
      accumulation, bf16 output:
      |h.w_n - y_n| <= 2^-7 |h|_2 |w_n|_2 + 2^-8 |y_n| (Cauchy-Schwarz over the 2^-9 rounding of each side).
    """

    MAX_CANDIDATES = 1 / 8  # of the vocabulary; beyond it a full matmul is cheaper than the gather

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach()
        self.kind, self.weight = kind, w
        self.bias = bias.detach() if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        wf = w.float()
        w_norm_max = float(wf.norm(dim=-1).max())
        K = w.shape[1]
        if kind == "int8":
            scale = (wf.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (V,) as serve/quant.quantize_int8
            # contiguous: the lm_head's weight may be a transposed view (load_checkpoint's decode layout)
            self.q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scale, self.bias32 = scale, self.bias.float()
            a = scale * self.q.float().abs().sum(-1)  # (V,)
            d_norm_max = float((wf - self.q.float() * scale[:, None]).norm(dim=-1).max())
            u = 2.0 ** -8 if w.dtype != torch.float32 else 2.0 ** -24
            # B = (c_h2 |h|_2 + c_hmax max|h| + c_b) (1 + u) + u max|y|, constants per weight, scalars per row
            self.c_h2 = d_norm_max + (K + 2) * 2.0 ** -24 * w_norm_max
            self.c_hmax = float(a.max()) * (0.51 / 32767 + 2.0 ** -20)
            self.c_b = float(self.bias32.abs().max()) * 2.0 ** -20
            self.u = u
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16).contiguous(), 1)
            self.c_h2, self.c_hmax, self.c_b, self.u = 2.0 ** -7 * w_norm_max, 0.0, 0.0, 2.0 ** -8

    @classmethod
    def build(cls, lm_head: nn.Linear) -> ArgmaxScreen | None:
        """The best screen for this CPU lm_head, or None (other dtypes, nothing to screen with)."""
        w = lm_head.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
            return None
        if kernels.available():
            return cls("int8", w, lm_head.bias)
        if w.dtype == torch.float32 and mkldnn_bf16():
            return cls("bf16", w, lm_head.bias)
        return None

    def argmax(self, h: torch.Tensor) -> torch.Tensor | None:
        """(B,) argmax ids for h (B, d), or None when the screen cannot decide cheaply."""
        if self.kind == "int8":
            y = kernels.q8_linear(h, self.q, self.scale, self.bias32, torch.float32)  # (B, V), bias included
            if y is None:
                return None
        else:
            y = torch.ops.mkldnn._linear_pointwise(h.to(torch.bfloat16), self.packed, None, "none", [], "").float()
            y += self.bias
        hf = h.float()
        toks = []
        for r in range(h.shape[0]):
            yr = y[r].numpy()  # numpy's compare + flatnonzero is ~3x faster than torch's on 51,200 entries
            top = float(yr.max())
            h2, hmax = float(hf[r].norm()), float(hf[r].abs().max())
            bound = (self.c_h2 * h2 + self.c_hmax * hmax + self.c_b) * (1 + self.u) + self.u * max(top, -float(
                yr.min()))
            if not math.isfinite(bound):
                return None
            idx = np.flatnonzero(yr >= top - 2 * bound)  # ascending ids
            if idx.size == 0 or idx.size > self.MAX_CANDIDATES * yr.size:
                return None
            tok = self._decide(hf[r], torch.from_numpy(idx), h.dtype)
            if tok is None:
                return None
            toks.append(tok)
        return torch.stack(toks)

    def _decide(self, h: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The argmax among candidate rows `idx` (ascending) of the logits the full lm_head computes for one row
        h (d,) fp32, or None when their values are too close for it to be known without those very logits.

        The candidates' dot products are recomputed here (fp32 accumulation, like the full lm_head), but the
        full lm_head sums in another order (its GEMM's blocking, its thread count), so the two can differ by a
        few ulp: on an exact or near tie that decides the argmax. Any two fp32 summation orders of the same K
        products and bias lie within e = 2 gamma_(K+1) S of each other, S = sum |h_k w_k| + |b| and gamma_n =
        n u / (1 - n u), u = 2^-24 (Higham's bound for each, doubled; taken 1 % wider for the float64 arithmetic
        here), and rounding to the lm_head's dtype is monotone; so the full value
        of row n lies in [round(z_n - e_n), round(z_n + e_n)]. The winner is certain when its lowest possible
        value beats every other candidate's highest (or equals it with a lower id, as argmax takes the first);
        otherwise the caller computes the full logits (rare: exact ties, or near ties within ~1e-6 relative in
        fp32, within a bf16 rounding step in bf16)."""
        w = self.weight[idx].float()  # (C, d)
        b = self.bias[idx].float()
        z = F.linear(h[None], w, b)[0].double()  # (C,)
        S = (h.abs()[None] @ w.abs().T)[0].double() + b.abs().double()
        nu = (w.shape[1] + 1) * 2.0 ** -24
        e = 2.02 * nu / (1 - nu) * S
        lo = (z - e).float().to(dtype).double()  # float(): round to fp32 (monotone), then to the lm_head's dtype
        hi = (z + e).float().to(dtype).double()
        # the likely winner: the full argmax if our values were its own (rounded to its dtype; first of equals)
        best = int(z.float().to(dtype).argmax())
        ids = torch.arange(len(idx))
        beaten = (hi < lo[best]) | ((hi <= lo[best]) & (ids > best))
        beaten[best] = True
        return idx[best] if bool(beaten.all()) else None
