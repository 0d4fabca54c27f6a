"""The native int8 kernel (phiforge/kernels): exactness against float64, its fallbacks, and its build cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from phiforge import kernels

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the torch fallback is in use")


def _case(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, generator=g) / 100
    b = torch.randn(N, generator=g)
    return x, q, s, b


@needs_kernel
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 37, 65), (3, 130, 640), (16, 64, 1000), (2, 5, 2560), (1, 9, 5000)])
def test_q8_linear_matches_float64(M, N, K):
    x, q, s, b = _case(M, N, K)
    y = kernels.q8_linear(x, q, s, b, torch.float32)
    exact = (x.double() @ q.double().t()) * s.double() + b.double()
    # The error is the int16 rounding of x: at most max|x_row| / 65534 per input, times sum|q s| per output.
    bound = x.abs().amax(1, keepdim=True).double() / 65534 * (q.double().abs() * s.double()[:, None]).sum(1) + 1e-4
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert ((y.double() - exact).abs() <= bound * 1.01 + 1e-5 * exact.abs()).all()
    # bf16 output is the same numbers rounded once; no bias works too
    yb = kernels.q8_linear(x, q, s, b, torch.bfloat16)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y.to(torch.bfloat16))
    torch.testing.assert_close(kernels.q8_linear(x, q, s, None, torch.float32), y - b, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_q8_linear_thread_count_does_not_change_results():
    x, q, s, b = _case(2, 301, 700, seed=1)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.q8_linear(x, q, s, b, torch.float32)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, kernels.q8_linear(x, q, s, b, torch.float32))


@needs_kernel
def test_q8_linear_declines_what_it_cannot_serve():
    x, q, s, b = _case(kernels.MAX_ROWS + 1, 8, 32)
    assert kernels.q8_linear(x, q, s, b, torch.float32) is None  # prefill-sized: torch's batched kernels
    x = x[:2].clone()
    x[1, 3] = float("nan")
    assert kernels.q8_linear(x, q, s, b, torch.float32) is None
    assert kernels.q8_linear(x[:1], q, s, b, torch.float16) is None
    with pytest.raises(ValueError, match="int8"):
        kernels.q8_linear(x[:1], q.float(), s, b, torch.float32)
    with pytest.raises(ValueError, match="int8"):
        kernels.q8_linear(x[:1], q[:, :16], s, b, torch.float32)  # K mismatch would read out of bounds


def _fresh_python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PHIFORGE_KERNEL_CACHE": str(tmp_path), **env})


def test_disabled_or_unbuildable_kernel_falls_back_with_one_warning(tmp_path):
    code = ("import torch, warnings\nwarnings.simplefilter('always')\nfrom phiforge import kernels\n"
            "from phiforge.serve.quant import QuantLinear\n"
            "print(kernels.available(), kernels.available())\n"
            "ql = QuantLinear(torch.nn.Linear(64, 8), 'int8')\nprint(ql.kernel, ql(torch.randn(1, 64)).shape)\n")
    off = _fresh_python(code, tmp_path, PHIFORGE_KERNELS="0")
    assert off.returncode == 0, off.stderr
    assert "False False" in off.stdout and "q8" not in off.stdout.split("\n")[1]
    assert "unavailable" not in off.stderr  # asked for: silent
    broken = _fresh_python(code, tmp_path, CC="false")  # a "compiler" that always fails
    assert broken.returncode == 0, broken.stderr
    assert "False False" in broken.stdout and broken.stderr.count("false failed") == 1
    assert not list(tmp_path.glob("*.so"))


@needs_kernel
def test_kernel_is_built_once_and_reused(tmp_path):
    code = "from phiforge import kernels\nprint(kernels.describe())"
    first = _fresh_python(code, tmp_path)
    assert first.returncode == 0 and "native int8 kernel" in first.stdout, first.stderr
    (so,) = tmp_path.glob("decode-*.so")
    stamp = so.stat().st_mtime_ns
    second = _fresh_python(code, tmp_path)
    assert second.stdout == first.stdout and so.stat().st_mtime_ns == stamp


@needs_kernel
@pytest.mark.parametrize("B,H,KV,L", [(1, 4, 4, 0), (2, 8, 2, 40), (3, 6, 3, 129)])
def test_attend_step_matches_torch(B, H, KV, L):
    """Rotary in place, cache write at L, softmax attention over 0..L: as the decode plan's torch code does it."""
    hd, rd, max_len = 16, 8, 160
    g = torch.Generator().manual_seed(L)
    qkv = torch.randn(B, (H + 2 * KV) * hd + 24, generator=g) * 2  # wider rows: fc1's part rides along
    cos, sin = torch.randn(rd, generator=g), torch.randn(rd, generator=g)
    ck, cv = torch.randn(2, B, KV, max_len, hd, generator=g)
    ref_qkv, ref_k, ref_v = qkv.clone(), ck.clone(), cv.clone()
    y = kernels.attend_step(qkv, H, KV, hd, cos, sin, ck, cv, L, 0.25)
    # reference
    qk = ref_qkv[:, :(H + KV) * hd].view(B, H + KV, hd)
    x = qk[..., :rd]
    x.copy_(x * cos + x.roll(rd // 2, -1) * sin)
    ref_k[:, :, L] = qk[:, H:]
    ref_v[:, :, L] = ref_qkv[:, (H + KV) * hd:(H + 2 * KV) * hd].view(B, KV, hd)
    q = qk[:, :H].reshape(B, KV, H // KV, hd) * 0.25
    att = (q @ ref_k[:, :, :L + 1].transpose(-1, -2)).softmax(-1)
    ref_y = (att @ ref_v[:, :, :L + 1]).reshape(B, H * hd)
    assert torch.equal(qkv, ref_qkv)  # rotary rounds as torch's separate multiplies and add do
    assert torch.equal(ck, ref_k) and torch.equal(cv, ref_v)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        kernels.attend_step(qkv, H, KV, hd, cos, sin, ck, cv, max_len, 0.25)  # past the cache
    assert kernels.attend_step(qkv.double(), H, KV, hd, cos, sin, ck, cv, L, 0.25) is None  # torch's path
