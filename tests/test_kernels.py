"""The native int8 kernel (phiforge/kernels): exactness against float64, its fallbacks, and its build cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 37, 65), (3, 130, 640), (16, 64, 1000), (2, 5, 2560), (1, 9, 5000),
                                   (2, 3, 70000)])  # the last: more than one int32 block a row
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
@pytest.mark.parametrize("flags", ["-mno-avx512vnni", "-mno-avx512f", "-mno-avx2 -mno-avx512f"])
def test_every_instruction_set_path_is_exact(tmp_path, flags):
    """The AVX-512BW, AVX2 and plain C paths (what other CPUs build) meet the same float64 bound as this one."""
    import ctypes

    so = tmp_path / "k.so"
    cc = os.environ.get("CC") or "cc"
    subprocess.run([cc, *kernels.FLAGS, *flags.split(), str(kernels.SOURCE), "-o", str(so), "-lm"], check=True)
    lib = ctypes.CDLL(str(so))
    lib.q8_isa.restype = ctypes.c_int
    assert lib.q8_isa() < 3  # not the VNNI path this machine builds by default
    for M, N, K in [(1, 37, 65), (3, 130, 1000), (1, 3, 70000), (kernels.MAX_ROWS + 5, 19, 3000)]:  # last: prefill
        x, q, s, b = _case(M, N, K)
        y = torch.empty(M, N)
        rc = lib.q8_linear(*(ctypes.c_void_p(t.data_ptr()) if isinstance(t, torch.Tensor) else ctypes.c_int64(t)
                             for t in (x, M, K, q, s, b, y, N)), ctypes.c_int(0))
        exact = (x.double() @ q.double().t()) * s.double() + b.double()
        bound = x.abs().amax(1, keepdim=True).double() / 65534 * (q.double().abs() * s.double()[:, None]).sum(1)
        assert rc == 0 and ((y.double() - exact).abs() <= bound * 1.01 + 1e-4 + 1e-5 * exact.abs()).all()


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
@pytest.mark.parametrize("K", [32, 3000, 9000])  # 3000: two int32 blocks and a tail; 9000: rows over L1, taken a
# span of inputs at a time on VNNI builds
def test_q8_linear_prefill_rows_are_the_decode_rows_numbers(K):
    """More than MAX_ROWS rows (prefill) on AVX2 / AVX-512BW / VNNI builds: tiles of rows sharing the weights,
    each row bit-identical to the same row alone; plain-C builds decline (torch's batched kernels then)."""
    x, q, s, b = _case(kernels.MAX_ROWS + 7, 37, K)
    y = kernels.q8_linear(x, q, s, b, torch.float32)
    if kernels._load().q8_isa() not in (1, 2, 3):
        assert y is None
        return
    assert all(torch.equal(y[m], kernels.q8_linear(x[m:m + 1], q, s, b, torch.float32)[0]) for m in range(len(x)))


@needs_kernel
def test_q8_linear_declines_what_it_cannot_serve():
    x, q, s, b = _case(2, 8, 32)
    x = x.clone()
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


def _vm_flags(addr: int) -> list[str]:
    """VmFlags of the mapping of this process holding `addr` (Linux /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return []


def test_streamed_buffers_sit_on_advised_huge_pages_and_live_while_a_view_does():
    import gc
    import mmap

    t = kernels.empty_streamed((3, 1 << 20), torch.int8)  # 3 MiB: one whole huge page and a tail
    assert t.shape == (3, 1 << 20) and t.dtype == torch.int8
    base = t.data_ptr()
    view = t[1:]
    del t
    gc.collect()
    view.fill_(7)  # the mapping outlives the tensor it was made for while a view of it lives
    assert int(view.sum()) == 7 * view.numel()
    assert kernels.empty_streamed((10,), torch.float32).shape == (10,)  # small: plain torch.empty
    if not hasattr(mmap, "MADV_HUGEPAGE") or not Path("/sys/kernel/mm/transparent_hugepage").is_dir():
        pytest.skip("no transparent huge pages on this OS or kernel: plain pages")
    assert base % kernels.HUGE_PAGE == 0 and "hg" in _vm_flags(base)  # aligned, advised MADV_HUGEPAGE


@needs_kernel
@pytest.mark.parametrize("B,H,KV,L,spread", [(1, 4, 4, 0, 2), (2, 8, 2, 40, 2), (3, 6, 3, 129, 2),
                                             (1, 2, 1, 70, 12)])  # scores far apart: exp underflows to 0
def test_attend_step_matches_torch(B, H, KV, L, spread):
    """Rotary in place, cache write at L, softmax attention over 0..L: as the decode plan's torch code does it."""
    hd, rd, max_len = 16, 8, 160
    g = torch.Generator().manual_seed(L)
    qkv = torch.randn(B, (H + 2 * KV) * hd + 24, generator=g) * spread  # wider rows: fc1's part rides along
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


@needs_kernel
@pytest.mark.parametrize("H,KV,hd,L,T,cache", [(4, 4, 80, 0, 37, torch.float16), (6, 2, 16, 9, 21, torch.float32),
                                                (3, 3, 20, 5, 6, torch.float16)])
def test_attend_prefill_is_each_token_attending_at_its_position(H, KV, hd, L, T, cache):
    """A prompt's attention (T tokens after L cached positions): rotary at each token's position, caches written as
    attend_step writes them (fp16 as .half()), token i attending to positions 0..L+i. hd 80 and 16 take the tiles
    of 4 queries (phi-2's and the tests' heads; 37 and 21 tokens: a partial tile), hd 20 the one-query path."""
    rd, max_len = 8, 64
    g = torch.Generator().manual_seed(T)
    qkv = torch.randn(T, (H + 2 * KV) * hd + 24, generator=g) * 2  # wider rows: fc1's part rides along
    cos, sin = torch.randn(T, rd, generator=g), torch.randn(T, rd, generator=g)
    ck, cv = (torch.randn(2, 1, KV, max_len, hd, generator=g) * 2).to(cache)
    ref_qkv, ref_k, ref_v = qkv.clone(), ck.clone(), cv.clone()
    y = kernels.attend_prefill(qkv, H, KV, hd, cos, sin, ck, cv, L, 0.3)
    qk = ref_qkv[:, :(H + KV) * hd].view(T, H + KV, hd)
    x = qk[..., :rd]
    x.copy_(x * cos[:, None] + x.roll(rd // 2, -1) * sin[:, None])
    ref_k[0, :, L:L + T] = qk[:, H:].transpose(0, 1).to(cache)
    ref_v[0, :, L:L + T] = ref_qkv[:, (H + KV) * hd:(H + 2 * KV) * hd].view(T, KV, hd).transpose(0, 1).to(cache)
    q = qk[:, :H].transpose(0, 1).reshape(KV, H // KV, T, hd) * 0.3
    scores = q @ ref_k[0, :, None, :L + T].float().transpose(-1, -2)  # (KV, G, T, L + T)
    seen = torch.ones(T, L + T, dtype=torch.bool).tril(diagonal=L)
    att = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ ref_v[0, :, None, :L + T].float()
    assert torch.equal(qkv, ref_qkv) and torch.equal(ck, ref_k) and torch.equal(cv, ref_v)
    torch.testing.assert_close(y, att.reshape(H, T, hd).transpose(0, 1).reshape(T, H * hd), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        kernels.attend_prefill(qkv, H, KV, hd, cos, sin, ck, cv, max_len - T + 1, 0.3)  # past the cache
    assert kernels.attend_prefill(qkv.double(), H, KV, hd, cos, sin, ck, cv, L, 0.3) is None  # torch's path


def _attend_fp16_case(L: int = 21):
    g = torch.Generator().manual_seed(7)
    B, H, KV, hd, rd, max_len = 2, 6, 3, 24, 8, 40  # hd 24: whole F16C vectors of 8
    qkv = torch.randn(B, (H + 2 * KV) * hd, generator=g) * 3
    edge = torch.tensor([1e-8, -3e-6, 6.1e-5, 65519.0, -65520.0, 7e4, 1 / 3, 2049.0])  # subnormal .. inf, ties
    qkv[0, (H + KV) * hd:(H + KV) * hd + 8] = edge  # into v (no rotary): its fp16 bits are checked
    cos, sin = torch.randn(rd, generator=g), torch.randn(rd, generator=g)
    ck, cv = (torch.randn(2, B, KV, max_len, hd, generator=g) * 2).half()
    return qkv, (B, H, KV, hd, rd, L), cos, sin, ck, cv


def _attend_fp16_reference(qkv, dims, cos, sin, ck, cv):
    """attend_step's expected output and caches for an fp16 cache: k, v rounded as .half() when written, then
    fp32 attention over the cache as stored."""
    B, H, KV, hd, rd, L = dims
    ref_qkv = qkv.clone()
    qk = ref_qkv[:, :(H + KV) * hd].view(B, H + KV, hd)
    x = qk[..., :rd]
    x.copy_(x * cos + x.roll(rd // 2, -1) * sin)
    k, v = ck.clone(), cv.clone()
    k[:, :, L] = qk[:, H:].half()
    v[:, :, L] = ref_qkv[:, (H + KV) * hd:(H + 2 * KV) * hd].view(B, KV, hd).half()
    q = qk[:, :H].reshape(B, KV, H // KV, hd) * 0.25
    att = (q @ k[:, :, :L + 1].float().transpose(-1, -2)).softmax(-1)
    return (att @ v[:, :, :L + 1].float()).reshape(B, H * hd), k, v


@needs_kernel
def test_attend_step_with_an_fp16_cache_rounds_as_torch_half():
    qkv, dims, cos, sin, ck, cv = _attend_fp16_case()
    B, H, KV, hd, rd, L = dims
    ref_y, ref_k, ref_v = _attend_fp16_reference(qkv, dims, cos, sin, ck, cv)
    y = kernels.attend_step(qkv, H, KV, hd, cos, sin, ck, cv, L, 0.25)
    assert torch.equal(ck, ref_k) and torch.equal(cv, ref_v)  # bit for bit .half()'s rounding (edges included)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    assert kernels.attend_step(qkv, H, KV, hd, cos, sin, ck, cv.float(), L, 0.25) is None  # mixed: torch's path


@needs_kernel
def test_fp16_cache_conversion_in_plain_c_is_torch_half(tmp_path):
    """The scalar fp32 <-> fp16 conversion (CPUs without F16C) rounds as .half() too: subnormals, ties, overflow."""
    import ctypes

    so = tmp_path / "k.so"
    cc = os.environ.get("CC") or "cc"
    subprocess.run([cc, *kernels.FLAGS, "-mno-f16c", "-mno-avx2", "-mno-avx512f", str(kernels.SOURCE), "-o", str(so),
                    "-lm"], check=True)
    lib = ctypes.CDLL(str(so))
    qkv, dims, cos, sin, ck, cv = _attend_fp16_case()
    B, H, KV, hd, rd, L = dims
    ref_y, ref_k, ref_v = _attend_fp16_reference(qkv, dims, cos, sin, ck, cv)
    y = torch.empty(B, H * hd)
    ptr = ctypes.c_void_p
    rc = lib.attend_step(ptr(qkv.data_ptr()), *map(ctypes.c_int64, (B, qkv.stride(0), H, KV, hd, rd)),
                         ptr(cos.data_ptr()), ptr(sin.data_ptr()), ptr(ck.data_ptr()), ptr(cv.data_ptr()),
                         ctypes.c_int(1), ctypes.c_int64(ck.shape[2]), ctypes.c_int64(L), ctypes.c_float(0.25),
                         ptr(y.data_ptr()))
    assert rc == 0 and torch.equal(ck, ref_k) and torch.equal(cv, ref_v)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_native_stack_with_an_fp16_cache(fmt):
    """The stack on an fp16 cache = the stack on an fp32 cache holding the same (fp16) values, except that the new
    k and v are stored rounded to fp16: the same numbers to fp16 rounding of one position."""
    g = torch.Generator().manual_seed(3)
    B, d, H, KV, hd, rd, inter, L, max_len = 2, 64, 4, 2, 16, 8, 300, 6, 10

    def weights(n, k):
        if fmt == "int4":
            return kernels.quantize_q4(torch.randn(n, k, generator=g) * 0.1), torch.randn(n, generator=g) / 10
        return (torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g) / 300,
                torch.randn(n, generator=g) / 10)

    layer = kernels.NativeLayer(num_heads=H, num_kv_heads=KV, head_dim=hd, rotary_dim=rd, intermediate=inter,
                                eps=1e-5, scale=hd ** -0.5, gelu_tanh=True, ln_w=torch.ones(d), ln_b=torch.zeros(d),
                                proj=weights((H + 2 * KV) * hd + inter, d), dense=weights(d, H * hd),
                                fc2=weights(d, inter))
    stack = kernels.NativeStack([layer])
    cos, sin = torch.randn(rd, generator=g), torch.randn(rd, generator=g)
    x16 = torch.randn(B, d, generator=g)
    x32 = x16.clone()
    k16, v16 = torch.randn(2, B, KV, max_len, hd, generator=g).half()
    k32, v32 = k16.float(), v16.float()
    assert stack(x16, L, cos, sin, [k16], [v16]) == 1 and stack(x32, L, cos, sin, [k32], [v32]) == 1
    assert torch.equal(k16[:, :, L], k32[:, :, L].half()) and torch.equal(v16[:, :, L], v32[:, :, L].half())
    torch.testing.assert_close(x16, x32, rtol=0, atol=2e-3 * float(x32.abs().max()))
    assert stack(x16, L, cos, sin, [k16], [v32]) == 0  # one dtype for all caches, else the caller's path


@needs_kernel
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("B,d,H,KV,hd,rd,inter", [(2, 64, 4, 2, 16, 8, 96),  # small: one thread runs it
                                                  (2, 256, 8, 4, 32, 16, 1000),  # split over threads; fc1 rows
                                                  (5, 320, 5, 5, 64, 32, 1300)])  # not whole chunks; int4: tiles
def test_native_layer_matches_float64_layer_and_declines_bad_input(fmt, B, d, H, KV, hd, rd, inter):  # of 4 + 1
    """A one-layer NativeStack = Phi's parallel block on int8 or int4 weights: LayerNorm, q/k/v/fc1, rotary, cache,
    attention, GELU, dense + fc2 + residual; compared with the same block in float64 on the dequantized weights,
    and the same numbers whatever the number of threads."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    L, max_len = 5, 12

    def q8(n, k):
        return (torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g) / 200,
                torch.randn(n, generator=g) / 10)

    def q4(n, k):
        return kernels.quantize_q4(torch.randn(n, k, generator=g) * 0.35), torch.randn(n, generator=g) / 10

    def lin(a, p):  # float64 reference on the dequantized weights
        w = kernels.dequantize_q4(p[0]).double() if fmt == "int4" else p[0].double() * p[1].double()[:, None]
        return a @ w.t() + p[-1].double()

    make = q4 if fmt == "int4" else q8
    proj, dense, fc2 = make((H + 2 * KV) * hd + inter, d), make(d, H * hd), make(d, inter)
    ln_w, ln_b = 1 + torch.randn(d, generator=g) / 10, torch.randn(d, generator=g) / 10
    layer = kernels.NativeLayer(num_heads=H, num_kv_heads=KV, head_dim=hd, rotary_dim=rd, intermediate=inter,
                                eps=1e-5, scale=hd ** -0.5, gelu_tanh=True, ln_w=ln_w, ln_b=ln_b, proj=proj,
                                dense=dense, fc2=fc2)
    x = torch.randn(B, d, generator=g)
    cos, sin = torch.randn(rd, generator=g), torch.randn(rd, generator=g)
    kc, vc = torch.randn(2, B, KV, max_len, hd, generator=g)
    x0, k0, v0 = x.clone(), kc.clone(), vc.clone()
    stack = kernels.NativeStack([layer])
    x1, k1, v1 = x.clone(), kc.clone(), vc.clone()
    n = torch.get_num_threads()
    x7, k7, v7 = x.clone(), kc.clone(), vc.clone()
    try:
        torch.set_num_threads(1)
        assert stack(x1, L, cos, sin, [k1], [v1]) == 1
        torch.set_num_threads(max(n, 2))
        assert stack(x, L, cos, sin, [kc], [vc]) == 1
        # more threads than cores: threads lose their core mid-phase, so others take units from their shares
        torch.set_num_threads(7)
        for _ in range(5):
            x7c, k7c, v7c = x7.clone(), k7.clone(), v7.clone()
            assert stack(x7c, L, cos, sin, [k7c], [v7c]) == 1
            assert torch.equal(x7c, x1) and torch.equal(k7c, k1) and torch.equal(v7c, v1)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(x, x1) and torch.equal(kc, k1) and torch.equal(vc, v1)
    def block(lin, dt):  # the layer in torch ops: x after it, and the cache with its new k
        h = F.layer_norm(x0.to(dt), (d,), ln_w.to(dt), ln_b.to(dt), 1e-5)
        qkv = lin(h, proj)
        qk = qkv[:, :(H + KV) * hd].view(B, H + KV, hd)
        r = qk[..., :rd].clone()
        qk[..., :rd] = r * cos.to(dt) + r.roll(rd // 2, -1) * sin.to(dt)
        k_all, v_all = k0.to(dt, copy=True), v0.to(dt, copy=True)
        k_all[:, :, L], v_all[:, :, L] = qk[:, H:], qkv[:, (H + KV) * hd:(H + 2 * KV) * hd].view(B, KV, hd)
        q = qk[:, :H].reshape(B, KV, H // KV, hd) * hd ** -0.5
        att = (q @ k_all[:, :, :L + 1].transpose(-1, -2)).softmax(-1)
        y = (att @ v_all[:, :, :L + 1]).reshape(B, H * hd)
        ff = F.gelu(qkv[:, (H + 2 * KV) * hd:], approximate="tanh")
        return lin(y, dense) + lin(ff, fc2) + x0.to(dt), k_all

    ref, k_all = block(lin, torch.float64)
    # int8: int16 activation rounding, 3 matmuls deep: seen ~1e-4 of the largest output (and ~3e-5 for k).
    # int4: activations in int8 per block of 64 (|error| <= max|block| / 254 an element), the weights' spread
    # here makes them large: seen up to 4.3e-2 (and 7e-3 for k), as the same layer in torch ops on q4_linear gives.
    tol_x, tol_k = (4e-4, 1e-4) if fmt == "int8" else (8e-2, 1.5e-2)
    torch.testing.assert_close(x.double(), ref, rtol=0, atol=tol_x * float(ref.abs().max()))
    torch.testing.assert_close(kc[:, :, L].double(), k_all[:, :, L], rtol=0, atol=tol_k * float(k_all.abs().max()))
    if fmt == "int4":  # the stack = q4_linear and torch ops between, to float rounding (seen 8e-7 of the largest)
        ops, _ = block(lambda a, p: kernels.q4_linear(a.contiguous(), p[0], p[1], torch.float32), torch.float32)
        torch.testing.assert_close(x, ops, rtol=0, atol=1e-5 * float(ops.abs().max()))
    assert torch.equal(kc[:, :, :L], k0[:, :, :L]) and torch.equal(vc[:, :, L + 1:], v0[:, :, L + 1:])
    # declines, leaving x as it was: inf/NaN activations, too many rows, another dtype
    bad = x.clone()
    bad[0, 3] = float("inf")
    assert stack(bad, L, cos, sin, [kc], [vc]) == 0 and bad[0, 3] == float("inf") and torch.equal(bad[1], x[1])
    many = torch.randn(kernels.MAX_ROWS + 1, d)
    assert stack(many, L, cos, sin, [torch.zeros(kernels.MAX_ROWS + 1, KV, max_len, hd)],
                 [torch.zeros(kernels.MAX_ROWS + 1, KV, max_len, hd)]) == 0
    assert stack(x.double(), L, cos, sin, [kc], [vc]) == 0
    assert stack(x, L, cos, sin, [kc.transpose(0, 1).contiguous().transpose(0, 1)], [vc]) == 0  # another layout
    with pytest.raises(ValueError):
        kernels.NativeLayer(num_heads=H, num_kv_heads=KV, head_dim=hd, rotary_dim=rd, intermediate=inter + 1,
                            eps=1e-5, scale=1.0, gelu_tanh=True, ln_w=ln_w, ln_b=ln_b, proj=proj, dense=dense, fc2=fc2)
    with pytest.raises(ValueError):  # one format per layer
        kernels.NativeLayer(num_heads=H, num_kv_heads=KV, head_dim=hd, rotary_dim=rd, intermediate=inter, eps=1e-5,
                            scale=1.0, gelu_tanh=True, ln_w=ln_w, ln_b=ln_b, proj=proj, dense=dense,
                            fc2=(q8 if fmt == "int4" else q4)(d, inter))


@needs_kernel
def test_native_stack_runs_layers_in_order_and_stops_where_one_declines():
    """A stack of layers in one call = the layers one call each; a layer that declines (inf in an activation)
    stops the stack there with x as that layer found it, for the caller's torch path."""
    g = torch.Generator().manual_seed(1)
    B, d, H, KV, hd, rd, inter, L, max_len = 1, 64, 4, 4, 16, 8, 128, 3, 8

    def layer(ln_b=None):
        def q8(n, k):
            return (torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                    torch.rand(n, generator=g) / 300, torch.randn(n, generator=g) / 10)

        return kernels.NativeLayer(num_heads=H, num_kv_heads=KV, head_dim=hd, rotary_dim=rd, intermediate=inter,
                                   eps=1e-5, scale=hd ** -0.5, gelu_tanh=True, ln_w=torch.ones(d),
                                   ln_b=torch.zeros(d) if ln_b is None else ln_b,
                                   proj=q8((H + 2 * KV) * hd + inter, d), dense=q8(d, H * hd), fc2=q8(d, inter))

    layers = [layer() for _ in range(3)]
    cos, sin = torch.randn(rd, generator=g), torch.randn(rd, generator=g)
    x = torch.randn(B, d, generator=g)
    caches = torch.randn(2, 3, B, KV, max_len, hd, generator=g)
    one = x.clone()
    one_caches = caches.clone()
    for i, lay in enumerate(layers):
        assert kernels.NativeStack([lay])(one, L, cos, sin, [one_caches[0, i]], [one_caches[1, i]]) == 1
    assert kernels.NativeStack(layers)(x, L, cos, sin, list(caches[0]), list(caches[1])) == 3
    assert torch.equal(x, one) and torch.equal(caches, one_caches)
    inf_bias = torch.zeros(d)
    inf_bias[5] = float("inf")
    stack = kernels.NativeStack([layers[0], layer(inf_bias), layers[2]])
    y, after_first = x.clone(), x.clone()
    assert kernels.NativeStack([layers[0]])(after_first, L + 1, cos, sin, [caches[0, 0].clone()], [caches[1, 0].clone()])
    assert stack(y, L + 1, cos, sin, list(caches[0]), list(caches[1])) == 1  # the second layer declined
    assert torch.equal(y, after_first)
    with pytest.raises(ValueError):
        kernels.NativeStack([])


# ---- int4 ("q4") ---------------------------------------------------------------------------------------------------

def _q4_case(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    # columns of different magnitudes: activation blocks with and without large entries
    x = torch.randn(M, K, generator=g) * (torch.rand(1, K, generator=g) * 3 + 0.1)
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g)
    return x, kernels.quantize_q4(w), b


def _q4_blocks(t, Kp):
    """(R, K) -> (R, Kp / 64, 64): zero-padded to Kp, in the kernel's slot order, one activation block a row."""
    t = torch.nn.functional.pad(t, (0, Kp - t.shape[1]))
    return t[:, kernels.q4_slot_positions(Kp)].view(t.shape[0], -1, 64)


def _q4_bound(x, deq):
    """The float64 error bound of q4_linear against x @ deq^T: each activation row is quantized to int8 per block
    of 64 slots (8 consecutive inputs of each of a super-block's groups), |x - sx xq| <= sx / 2 = max|x_block| /
    254, so an output's error is at most the sum over blocks of max|x_block| / 254 * sum|w| over the block (x1.01
    for the fp32 rounding of x / sx), plus fp32 accumulation (each product and partial sum rounded to 2^-24
    relative: 1e-5 of sum |w x| is ample up to K = 70000)."""
    Kp = (x.shape[1] + 63) // 64 * 64
    xb = _q4_blocks(x.double().abs(), Kp).amax(-1)  # (M, blocks)
    wb = _q4_blocks(deq.double().abs(), Kp).sum(-1)  # (N, blocks)
    return (xb / 254) @ wb.t() * 1.01 + 1e-5 * (x.double().abs() @ deq.double().abs().t()) + 1e-6


def _q4_emulated(x, deq):
    """x @ deq^T with x quantized as the kernel does it (int8 per block of 64 slots, fp32 scale and rounding), in
    float64: the kernel's integer products are exact, so only its fp32 accumulation differs from this."""
    M, K = x.shape
    Kp = (K + 63) // 64 * 64
    xp = _q4_blocks(x, Kp)
    sx = xp.abs().amax(-1, keepdim=True) / 127
    sx = torch.where(sx > 0, sx, torch.ones_like(sx))
    xq = ((xp * (1 / sx)).round().clamp(-127, 127).double() * sx.double()).view(M, Kp)
    back = torch.empty_like(xq)
    back[:, kernels.q4_slot_positions(Kp)] = xq  # slot order -> input order
    return back[:, :K] @ deq.double().t()


def _q4_check_result(y, x, wq, b):
    deq = kernels.dequantize_q4(wq)
    exact = x.double() @ deq.double().t() + b.double()
    assert ((y.double() - exact).abs() <= _q4_bound(x, deq)).all()
    # tighter: the same activation rounding in float64 leaves only fp32 accumulation (~1e-6 of sum|w x| seen)
    emulated = _q4_emulated(x, deq) + b.double()
    assert ((y.double() - emulated).abs() <= 2e-5 * (x.double().abs() @ deq.double().abs().t()) + 1e-5).all()


# K: one partial vector (1), one vector (64), a tail super-block of 1-3 vectors after whole ones (300, 700, 2500),
# whole super-blocks (2560), more than 2^16 inputs a row (70000); N small and odd; M up to MAX_ROWS, not multiples of 4
Q4_SHAPES = [(1, 1, 1), (1, 37, 65), (5, 3, 64), (3, 130, 300), (16, 64, 700), (2, 5, 2560), (7, 9, 2500),
             (2, 3, 70000), (37, 70, 300), (37, 40, 9000)]  # the last two: prefill-sized, weight rows in blocks
# (and a partial one); the last with rows too long for L1, taken a span of inputs at a time


def test_quantize_q4_is_q4_0_rule_and_dequantizes_exactly():
    """Each group of 32 has scale = its signed extreme / -8 (in fp16), codes round(w / scale) in [-8, 7]: the
    extreme comes back as itself (to fp16) and every weight within half a step, whatever the layout."""
    g = torch.Generator().manual_seed(0)
    for N, K in [(3, 2560), (5, 700), (2, 65), (1, 1)]:
        w = torch.randn(N, K, generator=g)
        wq = kernels.quantize_q4(w)
        Kp = (K + 63) // 64 * 64
        assert wq.K == K and wq.packed.dtype == torch.uint8 and tuple(wq.packed.shape) == (N, Kp // 2)
        assert wq.scales.dtype == torch.float16 and tuple(wq.scales.shape) == (N, 8 * ((Kp // 64 + 3) // 4))
        deq = kernels.dequantize_q4(wq)
        assert deq.shape == (N, K) and deq.dtype == torch.float32
        # which scale each position uses: dequantize one-hot scales (exact: codes times 1 or 0)
        step = wq.scales.float().abs()
        for n in range(N):
            for col in range(wq.scales.shape[1]):
                onehot = torch.zeros_like(wq.scales)
                onehot[n, col] = 1
                members = kernels.dequantize_q4(kernels.Q4Weight(wq.packed, onehot, K))[n] != 0
                if not members.any():
                    continue
                err = (w[n, members] - deq[n, members]).abs()
                # half a step, but a step where w / scale rounds to +8 (the extreme's opposite sign) and clamps to 7
                clamped = w[n, members] / wq.scales[n, col].float() > 7.5
                tol = torch.where(clamped, step[n, col], step[n, col] / 2) * (1 + 1e-3) + 1e-7
                assert (err <= tol).all()
                ext = w[n, members][w[n, members].abs().argmax()]
                assert deq[n, members].abs().max() == pytest.approx(abs(float(ext)), rel=1e-3)
        torch.testing.assert_close(kernels.dequantize_q4(kernels.q4_cat([wq, wq])), torch.cat([deq, deq]))
    # a full super-block's groups are 32 consecutive inputs each (Q4_0's), their codes in the layout's lanes:
    # group i in the slots o with (o % 32) // 4 == i (both nibbles of bytes 4i..4i+3 of every vector)
    w = torch.zeros(1, 256)
    w[0, 160:192] = 1.0  # group 5
    wq = kernels.quantize_q4(w)
    assert torch.equal(wq.scales.float()[0] != 0, torch.arange(8) == 5)
    assert torch.equal(kernels.dequantize_q4(wq), w)
    p = wq.packed.view(4, 1, 32)
    slots = torch.cat([p & 15, p >> 4], 1).reshape(256)  # slot 64t + 32h + j: nibble h of byte j of vector t
    assert torch.equal(slots != 8, torch.arange(256) % 32 // 4 == 5)
    # a row's last, partial super-block (v < 4 vectors): groups of 8v consecutive inputs
    for K, v in ((320, 1), (384, 2), (448, 3)):
        w = torch.zeros(1, K)
        w[0, 256 + 8 * v * 3:256 + 8 * v * 4] = 1.0  # its group 3
        wq = kernels.quantize_q4(w)
        assert torch.equal(wq.scales.float()[0] != 0, torch.arange(16) == 11), K
        assert torch.equal(kernels.dequantize_q4(wq), w)


@needs_kernel
@pytest.mark.parametrize("M,N,K", Q4_SHAPES)
def test_q4_linear_matches_float64(M, N, K):
    x, wq, b = _q4_case(M, N, K)
    y = kernels.q4_linear(x, wq, b, torch.float32)
    assert y.shape == (M, N) and y.dtype == torch.float32
    _q4_check_result(y, x, wq, b)
    # bf16 output is the same numbers rounded once; bf16 input is read as fp32; no bias works too
    yb = kernels.q4_linear(x, wq, b, torch.bfloat16)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y.to(torch.bfloat16))
    xb = x.to(torch.bfloat16)
    assert torch.equal(kernels.q4_linear(xb, wq, b, torch.float32), kernels.q4_linear(xb.float(), wq, b,
                                                                                       torch.float32))
    torch.testing.assert_close(kernels.q4_linear(x, wq, None, torch.float32), y - b, rtol=1e-5, atol=1e-4)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


# what other CPUs build (-march=native there): flags to build that path here, the CPU flags needed to run it
Q4_PATHS = {"portable C": ("-mno-avx2 -mno-avx512f", 0, set()),
            "AVX2": ("-mno-avx512f -mno-avxvnni", 1, {"avx2", "fma", "f16c"}),
            "AVX2 without FMA": ("-mno-avx512f -mno-avxvnni -mno-fma", 1, {"avx2", "f16c"}),
            "AVX-VNNI": ("-mno-avx512f -mavxvnni", 4, {"avx2", "fma", "f16c", "avx_vnni"}),
            "AVX-512 VNNI": ("-mavx512f -mavx512bw -mavx512vl -mavx512vnni", 3,
                             {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})}


@needs_kernel
@pytest.mark.parametrize("path", list(Q4_PATHS))
def test_q4_every_instruction_set_path_is_exact(tmp_path, path):
    """Every int4 path another CPU builds compiles here; those this CPU can run meet the float64 bound (and the
    emulated activation rounding) at 1 and 2 threads with the same numbers; the others are skipped, saying so."""
    import ctypes

    flags, isa, needs = Q4_PATHS[path]
    so = tmp_path / "k.so"
    cc = os.environ.get("CC") or "cc"
    build = subprocess.run([cc, *kernels.FLAGS, "-fopenmp", *flags.split(), str(kernels.SOURCE), "-o", str(so), "-lm"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    missing = needs - _cpu_flags()
    if missing:
        pytest.skip(f"built; this CPU cannot run the {path} path (no {', '.join(sorted(missing))})")
    lib = ctypes.CDLL(str(so))
    lib.q4_isa.restype = ctypes.c_int
    assert lib.q4_isa() == isa
    n = torch.get_num_threads()
    for M, N, K in Q4_SHAPES:
        x, wq, b = _q4_case(M, N, K, seed=1)
        ys = []
        for threads in (1, 2):
            y = torch.empty(M, N)
            try:
                torch.set_num_threads(threads)  # the library's OpenMP runtime is torch's: it follows
                rc = lib.q4_linear(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(M), ctypes.c_int64(K),
                                   ctypes.c_void_p(wq.packed.data_ptr()), ctypes.c_void_p(wq.scales.data_ptr()),
                                   ctypes.c_void_p(b.data_ptr()), ctypes.c_void_p(y.data_ptr()),
                                   ctypes.c_int64(N), ctypes.c_int(0))
            finally:
                torch.set_num_threads(n)
            assert rc == 0
            ys.append(y)
        assert torch.equal(ys[0], ys[1])
        _q4_check_result(ys[0], x, wq, b)


@needs_kernel
def test_q4_linear_thread_count_does_not_change_results():
    x, wq, b = _q4_case(5, 301, 2600, seed=2)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.q4_linear(x, wq, b, torch.float32)
        torch.set_num_threads(2)
        two = kernels.q4_linear(x, wq, b, torch.float32)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


@needs_kernel
def test_q4_prefill_tiles_give_each_row_the_numbers_of_four_row_tiles():
    """Prefill takes activation rows 8 at a time where the build has 32 vector registers (AVX-512VL), else 4, and
    long rows a span of inputs at a time (9000: over L1 in either): a row's numbers must depend on neither (37 rows:
    tiles of 8, then 4, then 1), so every row equals the same row computed in a call of 4 rows (or alone, for the
    last), which decoding's path computes whole."""
    for K in (2600, 9000):
        x, wq, b = _q4_case(37, 70, K, seed=4)
        whole = kernels.q4_linear(x, wq, b, torch.float32)
        for m in range(0, 36, 4):
            assert torch.equal(whole[m:m + 4], kernels.q4_linear(x[m:m + 4], wq, b, torch.float32)), (K, m)
        assert torch.equal(whole[36:], kernels.q4_linear(x[36:], wq, b, torch.float32)), K


@needs_kernel
def test_int8_and_int4_calls_from_several_threads_keep_their_own_scratch():
    """q8_linear and q4_linear quantize the activations into scratch kept by each calling thread between calls (no
    fresh pages every prefill): calls running at once from several threads, and calls of other sizes in between
    (the scratch grows and is reused), give every call the numbers it gives alone."""
    import threading

    cases = [("q8", *_case(40, 33, 5000, seed=s)) for s in range(3)] + \
            [("q4", *_q4_case(40, 33, 5000, seed=s)) for s in range(3)]

    def run(case):
        kind, x, *w = case
        if kind == "q8":
            return kernels.q8_linear(x, *w, torch.float32)
        return kernels.q4_linear(x, *w, torch.float32)

    alone = [run(c) for c in cases]
    small = [run((k, x[:3], *w)) for k, x, *w in cases]
    out: dict[int, list[torch.Tensor]] = {}

    def worker(i):
        out[i] = [run(cases[i]) for _ in range(3)] + [run((cases[i][0], cases[i][1][:3], *cases[i][2:]))]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(cases)):
        assert all(torch.equal(y, alone[i]) for y in out[i][:3]) and torch.equal(out[i][3], small[i]), i


@needs_kernel
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_rows_reads_strided_rows_and_agrees_with_torch(approximate):
    """Prefill's GELU on the fc1 columns of a fused projection's output (rows strided), into a contiguous tensor:
    torch's numbers to a few ulp of the inputs (where GELU is tiny, 1 + tanh cancels in both), tails included;
    what it cannot serve is declined, not mangled."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(37, 500, generator=g) * 4
    y[0, 200:210] = torch.tensor([-1e4, -30.0, -9.0, -1e-30, 0.0, 1e-30, 9.0, 30.0, 1e4, 3.0e38])
    out = kernels.gelu_rows(y[:, 200:], approximate)
    assert out.is_contiguous() and out.shape == (37, 300)
    torch.testing.assert_close(out, F.gelu(y[:, 200:], approximate=approximate), rtol=1e-6, atol=2e-6)
    assert kernels.gelu_rows(y[:, 200:].double(), approximate) is None
    assert kernels.gelu_rows(y.t(), approximate) is None  # columns strided: not rows
    assert kernels.gelu_rows(y, "sigmoid") is None


@needs_kernel
def test_q4_linear_declines_what_it_cannot_serve():
    x, wq, b = _q4_case(2, 8, 96)
    x = x.clone()
    x[1, 3] = float("nan")
    assert kernels.q4_linear(x, wq, b, torch.float32) is None
    x[1, 3] = float("inf")
    assert kernels.q4_linear(x, wq, b, torch.float32) is None
    assert kernels.q4_linear(x[:1], wq, b, torch.float16) is None
    assert kernels.q4_linear(x[:1].double(), wq, b, torch.float32) is None
    with pytest.raises(ValueError, match="q4_linear"):
        kernels.q4_linear(x[:1, :64], wq, b, torch.float32)  # K mismatch would read out of bounds
    with pytest.raises(ValueError, match="q4_linear"):
        kernels.q4_linear(x[:1], kernels.Q4Weight(wq.packed, wq.scales.float(), wq.K), b, torch.float32)
    with pytest.raises(ValueError, match="q4_linear"):
        kernels.q4_linear(x[:1], wq, b[:3], torch.float32)
    with pytest.raises(ValueError, match="q4_cat"):
        kernels.q4_cat([wq, kernels.quantize_q4(torch.randn(2, 64))])
