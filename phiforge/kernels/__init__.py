"""Optional native CPU kernels for decoding, built on first use with the machine's C compiler; torch paths
otherwise. Both live in decode.c (see it for the method and the error of each):

- `q8_linear`: y = x @ (q * scale)^T + bias for int8 weights at small batch. Batch-1 decoding of an int8 model
  is a matrix-vector product per layer, and torch's own `_weight_int8pack_mm` is compute-bound there (~15 GB/s
  of weights a core, measured on torch 2.13 with AVX-512); this kernel multiplies in exact integer arithmetic
  and streams at the speed of a plain read of the same bytes (bench/serve.py).
- `attend_step`: one decode step's rotary, KV-cache write and attention for fp32 activations, in one call
  instead of ~20 small torch ops a layer (each has microseconds of fixed cost: at a 100M model they weigh as
  much as the int8 weights themselves).
- `NativeLayer` / `NativeStack`: a whole decoder layer of an int8 or int4 model with fp32 activations (LayerNorm,
  the fused q/k/v/fc1 matmul, attend_step, GELU, dense + fc2 + residual), and all of a step's layers in one call.
- `quantize_q4` / `q4_linear`: int4 weights (symmetric groups of 32 with an fp16 scale: GGUF Q4_0's bits, 4.5 a
  weight, in a layout made for the loop) times activations quantized to int8 per block of 64, exact integer
  products (AVX2 maddubs/madd, VNNI dpbusd, or C); any number of rows (prefill's are a cache-blocked matmul).
  q8_linear serves prefill's rows too on AVX2 / AVX-512BW / VNNI builds (tiles of rows sharing the weights).

Build: `cc -O3 -march=native -fopenmp -shared -fPIC` (CC overrides the compiler; without OpenMP support it is
built single-threaded) into PHIFORGE_KERNEL_CACHE (default ~/.cache/phiforge/kernels), keyed by a hash of the
source, flags, compiler and CPU, written atomically (concurrent first uses are safe). No compiler, a failed
build: `available()` is False, one warning says why, and callers use torch's kernels (PHIFORGE_KERNELS=0: the
same, silently).
Nothing here is imported by `import phiforge`; the build runs on the first call only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

SOURCE = Path(__file__).with_name("decode.c")
# -ffp-contract=off: a * b + c rounds twice, as torch's separate ops do (attend_step's rotary matches them)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]
MAX_ROWS = 16  # above this many activation rows (prefill), torch's batched kernels win
KV_DTYPES = (torch.float32, torch.float16)  # KV caches attend_step and decode_layers read and write
ISA_NAMES = {3: "AVX-512 VNNI", 2: "AVX-512BW", 1: "AVX2", 0: "portable C"}
Q4_ISA_NAMES = {**ISA_NAMES, 4: "AVX-VNNI"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why_not = ""


def cache_dir() -> Path:
    return Path(os.environ.get("PHIFORGE_KERNEL_CACHE") or Path.home() / ".cache" / "phiforge" / "kernels")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and feature flags (Linux), else the platform strings."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compile(cc: str, out: Path) -> str:
    """Build the library at `out`; returns "" or the reason it failed."""
    errors = []
    for extra in (["-fopenmp"], []):  # OpenMP where the compiler has it (Apple clang does not)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            so = Path(tmp) / out.name
            proc = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", str(so), "-lm"], capture_output=True,
                                  text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(so, out)  # atomic: a concurrent build of the same key writes the same bytes
                return ""
            errors.append(proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"])
    return f"{cc} failed: {errors[0][0]}"


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _why_not
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("PHIFORGE_KERNELS", "1") == "0":
            _why_not = "disabled by PHIFORGE_KERNELS=0"
            return None  # asked for: no warning
        cc = os.environ.get("CC") or "cc"
        if shutil.which(cc) is None:
            _why_not = f"no C compiler ({cc!r} not found; set CC)"
        else:
            try:
                version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
                key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), cc, version, _cpu_id()])
                                     .encode()).hexdigest()[:16]
                out = cache_dir() / f"decode-{key}.so"
                if not out.exists():
                    out.parent.mkdir(parents=True, exist_ok=True)
                    _why_not = _compile(cc, out)
                if not _why_not:
                    lib = ctypes.CDLL(str(out))
                    lib.q8_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_int]
                    lib.q8_linear.restype = ctypes.c_int
                    lib.attend_step.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 6, ctypes.c_void_p,
                                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]
                    lib.attend_step.restype = ctypes.c_int
                    lib.decode_layers.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                                  ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
                    lib.decode_layers.restype = ctypes.c_int64
                    lib.q8_isa.restype = ctypes.c_int
                    lib.q4_linear.argtypes = lib.q8_linear.argtypes
                    lib.q4_linear.restype = ctypes.c_int
                    lib.q4_isa.restype = ctypes.c_int
                    lib.gelu_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_void_p, ctypes.c_int]
                    lib.gelu_rows.restype = None
                    lib.attend_prefill.argtypes = lib.attend_step.argtypes
                    lib.attend_prefill.restype = ctypes.c_int
                    _lib = lib
            except (OSError, subprocess.SubprocessError) as e:
                _why_not = f"{type(e).__name__}: {e}"
        if _lib is None:  # said once: a failed build is worth knowing about, a slower path is not an error
            warnings.warn(f"phiforge: native decode kernels unavailable ({_why_not}); using torch's kernels",
                          RuntimeWarning, stacklevel=3)
        return _lib


def available() -> bool:
    """Whether the native kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def describe() -> str:
    """One line for reports: which instruction set the kernel uses, or why it is not in use."""
    lib = _load()
    if lib is None:
        return f"torch kernels ({_why_not})"
    return f"native int8 kernel ({ISA_NAMES.get(lib.q8_isa(), '?')}), int4 ({Q4_ISA_NAMES.get(lib.q4_isa(), '?')})"


def q8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor | None:
    """x (M, K) -> (M, N) = x @ (q * scale[:, None])^T + bias in `out_dtype` (fp32 or bf16), for CPU int8 `q`
    (N, K), fp32 `scale` (N,) and fp32 `bias` (N,) or None, all contiguous. None where the kernel cannot serve
    the call (not built, more than MAX_ROWS rows where the build has no prefill tiles (plain-C builds have none),
    another dtype or device, inf/NaN in x): use torch instead."""
    fn = q8_matmul(q, scale, bias, out_dtype)
    return None if fn is None else fn(x)


def q8_matmul(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """`q8_linear` with the weight side checked once: x -> y or None (as q8_linear), or None when the kernel
    is not built. The decode plan keeps one per fused matrix: a call then costs ~3 us less in Python, which at a
    100M model is ~5 % of a token. The tensors must not be resized while `fn` lives (it holds their pointers)."""
    lib = _load()
    if lib is None or q.device.type != "cpu" or out_dtype not in (torch.float32, torch.bfloat16):
        return None
    if q.dtype != torch.int8 or q.ndim != 2 or scale.dtype != torch.float32 or scale.shape != q.shape[:1] \
            or bias is not None and (bias.dtype != torch.float32 or bias.shape != q.shape[:1]) \
            or not (q.is_contiguous() and scale.is_contiguous() and (bias is None or bias.is_contiguous())):
        raise ValueError("q8_linear: needs contiguous int8 q (N, K) and fp32 scale/bias (N,)")
    N, K = q.shape
    ptrs = (q.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr())
    bf16 = int(out_dtype == torch.bfloat16)
    keep = (q, scale, bias)  # the pointers' owners live as long as fn
    many = lib.q8_isa() in (1, 2, 3)  # AVX2 / AVX-512BW / VNNI builds: prefill's rows in tiles (decode.c, q8_tile)

    def fn(x: torch.Tensor) -> torch.Tensor | None:
        M = x.shape[0]
        if M > MAX_ROWS and not many or x.device.type != "cpu":
            return None
        if x.shape[1] != K:
            raise ValueError(f"q8_linear: x has {x.shape[1]} columns, the weights {K}")
        x = x.float().contiguous()
        y = torch.empty(M, N, dtype=out_dtype)
        rc = lib.q8_linear(x.data_ptr(), M, K, ptrs[0], ptrs[1], ptrs[2], y.data_ptr(), N, bf16)
        if rc == -1:
            raise MemoryError("q8_linear: out of memory for the quantized activations")
        return y if rc == 0 else None

    fn.keep = keep  # type: ignore[attr-defined]
    return fn


# ---- memory the kernels stream ------------------------------------------------------------------------------------

HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge page


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _huge_mapping(nbytes: int) -> ctypes.Array | None:
    """A buffer of nbytes on its own anonymous private mapping that starts on a huge-page boundary and is advised
    MADV_HUGEPAGE, unmapped when the buffer is collected; None where that cannot be made. Aligned by hand (map one
    huge page more, unmap the slack) so every whole 2 MiB of the buffer can be one page, and exact in length so the
    tail stays in small pages: nothing is resident that the tensor does not use."""
    libc, page = _libc(), mmap.PAGESIZE
    size = -(-nbytes // page) * page
    raw = libc.mmap(None, size + HUGE_PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                    -1, 0)
    if raw is None or raw == ctypes.c_void_p(-1).value:
        return None
    start = -(-raw // HUGE_PAGE) * HUGE_PAGE
    if start > raw:
        libc.munmap(raw, start - raw)
    if raw + HUGE_PAGE > start:
        libc.munmap(start + size, raw + HUGE_PAGE - start)
    libc.madvise(start, size, mmap.MADV_HUGEPAGE)  # an advice: a kernel without THP keeps small pages

    class Mapping(ctypes.c_char * nbytes):  # type: ignore[misc, valid-type]
        def __del__(self) -> None:  # the last tensor on it is gone (torch.frombuffer holds the buffer)
            libc.munmap(start, size)

    return Mapping.from_address(start)


def empty_streamed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty for a CPU weight buffer a decode kernel streams once per token, backed where the OS allows by
    transparent huge pages (Linux's default THP mode, "madvise", gives them only when asked: `_huge_mapping`).
    With 4 KiB pages a 2.6 GB int8 phi-2 is ~650,000 TLB entries a token; with 2 MiB pages ~1,300. Measured on
    the 2-core Zen 3 VM (bench/laptop.py's machine; interleaved runs of the int8 dot-product loop over 420 MB):
    median 22.5 -> 24.3 GB/s on two threads, 13.2 -> 14.9 on one. Buffers under a huge page, other systems, and
    kernels without THP get plain torch.empty (a huge page is an advice, never required)."""
    nbytes = math.prod(shape) * dtype.itemsize
    buf = _huge_mapping(nbytes) if nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE") else None
    if buf is None:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


# ---- int4 ("q4"): symmetric 4-bit groups of 32 with an fp16 scale, in the layout decode.c's loop wants ----------

class Q4Weight(NamedTuple):
    """An (N, K) weight in the q4 format (decode.c explains the layout): `packed` uint8 (N, Kp / 2) codes, two a
    byte (Kp = K rounded up to 64), `scales` float16 (N, 8 super-blocks); w = scale (code - 8)."""

    packed: torch.Tensor
    scales: torch.Tensor
    K: int


Q4_GROUP = 32  # weights per scale (fewer only in a row's last, partial super-block of 256)


@functools.cache
def q4_slot_positions(Kp: int) -> torch.Tensor:
    """The input position each code slot of a q4 row holds (Kp,): slot s = 256 b + 64 t + 32 h + 4 i + j of a
    super-block b of v vectors (v = 4, fewer in a row's last) holds input 256 b + 8 v i + 8 t + 4 h + j, so that
    group i (lane i of the kernel's vector multiply-adds: slots with (s % 32) // 4 == i) is the 8 v consecutive
    inputs 256 b + 8 v i ... (32 in a whole super-block), as in Q4_0, and the kernel's activation block t (slots
    64 t ...) holds 8 consecutive inputs of each group. decode.c's acts4_gather places activations by the same rule."""
    nv = Kp // 64
    s = torch.arange(Kp)
    b, o = s // 256, s % 256
    v = torch.clamp(nv - 4 * b, max=4)
    t, h, i, j = o // 64, o % 64 // 32, o % 32 // 4, o % 4
    return 256 * b + 8 * v * i + 8 * t + 4 * h + j


@functools.cache
def _q4_scale_columns(Kp: int) -> torch.Tensor:
    """The scale column of each of a row's Kp input positions: super-block b's group i, 8 b + i."""
    p = torch.arange(Kp)
    b = p // 256
    v = torch.clamp(Kp // 64 - 4 * b, max=4)
    return 8 * b + (p % 256) // (8 * v)


def quantize_q4(w: torch.Tensor) -> Q4Weight:
    """(N, K) float weight -> Q4Weight on the CPU: per group of 32 consecutive inputs (8 v in a row's last,
    partial super-block), scale = the group's signed extreme / -8 (rounded to fp16) and q = round(w / scale)
    clamped to [-8, 7], Q4_0's rule; codes then placed in the kernel's slots (q4_slot_positions). Pure torch (no
    compiled kernel needed); holds one fp32 copy of w at a time."""
    N, K = w.shape
    Kp = (K + 63) // 64 * 64
    wf = w.detach().to("cpu", torch.float32)
    if Kp != K:
        wf = torch.nn.functional.pad(wf, (0, Kp - K))
    codes = torch.empty(N, Kp, dtype=torch.uint8)  # by input position
    scales = []
    full = Kp // 256 * 256
    for start, end, members in ((0, full, 32), (full, Kp, (Kp - full) // 8)):
        if end == start:
            continue
        g = wf[:, start:end].view(N, -1, members)  # (N, groups, members): consecutive inputs
        ext = g.gather(-1, g.abs().argmax(-1, keepdim=True))  # the signed extreme
        d = (ext / -8).to(torch.float16)
        df = d.float()
        q = torch.where(df == 0, 0.0, g / df).round_().clamp_(-8, 7).add_(8).to(torch.uint8)
        codes[:, start:end] = q.view(N, -1)
        scales.append(d.view(N, -1))
    del wf
    c = codes[:, q4_slot_positions(Kp)].view(N, Kp // 64, 2, 32)  # by slot
    packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, Kp // 2)
    return Q4Weight(packed.contiguous(), torch.cat(scales, 1).contiguous(), K)


def dequantize_q4(wq: Q4Weight) -> torch.Tensor:
    """The (N, K) fp32 weight a Q4Weight stands for (exactly: scale (code - 8) in fp32)."""
    N = wq.packed.shape[0]
    Kp = wq.packed.shape[1] * 2
    p = wq.packed.view(N, Kp // 64, 1, 32)
    slots = torch.cat([p & 15, p >> 4], 2).view(N, Kp)
    codes = torch.empty_like(slots)
    codes[:, q4_slot_positions(Kp)] = slots  # by input position
    return ((codes.float() - 8) * wq.scales.float()[:, _q4_scale_columns(Kp)])[:, :wq.K].contiguous()


def q4_cat(parts: list[Q4Weight]) -> Q4Weight:
    """Q4Weights of the same K stacked along the output dim (exact: every row has its own scales)."""
    if not parts or any(p.K != parts[0].K for p in parts):
        raise ValueError("q4_cat: needs one or more Q4Weights of the same K")
    if len(parts) == 1:
        return parts[0]
    return Q4Weight(torch.cat([p.packed for p in parts]), torch.cat([p.scales for p in parts]), parts[0].K)


def _q4_check(wq: Q4Weight, bias: torch.Tensor | None) -> None:
    packed, scales, K = wq
    N = packed.shape[0] if packed.ndim == 2 else -1
    nv = (K + 63) // 64
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != 32 * nv \
            or scales.dtype != torch.float16 or tuple(scales.shape) != (N, 8 * ((nv + 3) // 4)) \
            or bias is not None and (bias.dtype != torch.float32 or bias.shape != (N,)) \
            or not (packed.is_contiguous() and scales.is_contiguous() and (bias is None or bias.is_contiguous())) \
            or packed.device.type != "cpu" or scales.device.type != "cpu":
        raise ValueError("q4_linear: needs a contiguous CPU Q4Weight (quantize_q4's) and fp32 bias (N,) or None")


def q4_linear(x: torch.Tensor, wq: Q4Weight, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor | None:
    """x (M, K) -> (M, N) = x @ W^T + bias in `out_dtype` (fp32 or bf16) for a Q4Weight W (N, K) and fp32 `bias`
    (N,) or None, any M: decoding's few rows, and prefill's many (a cache-blocked matmul on the same exact integer
    products, faster than dequantizing for torch). None where the kernel cannot serve the call (not built,
    another dtype or device, inf/NaN in x): use torch instead, e.g. F.linear(x, dequantize_q4(wq)) + bias."""
    fn = q4_matmul(wq, bias, out_dtype)
    return None if fn is None else fn(x)


def q4_matmul(wq: Q4Weight, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """`q4_linear` with the weight side checked once: x -> y or None (as q4_linear), or None when the kernel is
    not built. The tensors must not be resized while `fn` lives (it holds their pointers)."""
    lib = _load()
    if lib is None or out_dtype not in (torch.float32, torch.bfloat16):
        return None
    _q4_check(wq, bias)
    N, K = wq.packed.shape[0], wq.K
    ptrs = (wq.packed.data_ptr(), wq.scales.data_ptr(), None if bias is None else bias.data_ptr())
    bf16 = int(out_dtype == torch.bfloat16)
    keep = (wq, bias)

    def fn(x: torch.Tensor) -> torch.Tensor | None:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return None
        if x.ndim != 2 or x.shape[1] != K:
            raise ValueError(f"q4_linear: x has shape {tuple(x.shape)}, the weights {K} columns")
        M = x.shape[0]
        x = x.float().contiguous()
        y = torch.empty(M, N, dtype=out_dtype)
        rc = lib.q4_linear(x.data_ptr(), M, K, ptrs[0], ptrs[1], ptrs[2], y.data_ptr(), N, bf16)
        if rc == -1:
            raise MemoryError("q4_linear: out of memory for the quantized activations")
        return y if rc == 0 else None

    fn.keep = keep  # type: ignore[attr-defined]
    return fn


def _attend_serves(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor) -> bool:
    """Whether the native attentions take these tensors: fp32 rows of contiguous channels on the CPU, contiguous
    fp32 rotary tables, contiguous caches of one KV_DTYPES dtype."""
    return qkv.dtype == torch.float32 and qkv.stride(-1) == 1 and qkv.device.type == "cpu" \
        and k_cache.dtype in KV_DTYPES and v_cache.dtype == k_cache.dtype and k_cache.is_contiguous() \
        and v_cache.is_contiguous() and cos.dtype == torch.float32 and cos.is_contiguous() \
        and sin_signed.is_contiguous()


def attend_step(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                sin_signed: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
                scale: float) -> torch.Tensor | None:
    """One decode step's attention for B rows of one new token, all fp32 on CPU: rotary on the first
    `cos.numel()` channels of every q and k head of `qkv` (B, >= (H + 2 KV) hd; rows may be a slice of a wider
    projection output; rotated in place), k and v written into `k_cache`/`v_cache` (B, KV, max_len, hd; fp32, or
    fp16: rounded as .half() does) at `pos`, then softmax((q scale) . k_t, t <= pos) over v_t -> (B, H hd).
    `sin_signed` is sin with its first half negated (rotate_half as a roll). None where the kernel cannot serve
    the call (not built, other dtypes or layouts): use torch."""
    lib = _load()
    B = qkv.shape[0]
    if lib is None or not _attend_serves(qkv, cos, sin_signed, k_cache, v_cache):
        return None
    if qkv.shape[1] < (num_heads + 2 * num_kv_heads) * head_dim or num_heads % num_kv_heads \
            or tuple(k_cache.shape) != (B, num_kv_heads, k_cache.shape[2], head_dim) \
            or v_cache.shape != k_cache.shape or not 0 <= pos < k_cache.shape[2] or cos.numel() > head_dim:
        raise ValueError("attend_step: shapes do not match the heads and the cache")
    y = torch.empty(B, num_heads * head_dim)
    rc = lib.attend_step(qkv.data_ptr(), B, qkv.stride(0), num_heads, num_kv_heads, head_dim, cos.numel(),
                         cos.data_ptr(), sin_signed.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                         int(k_cache.dtype == torch.float16), k_cache.shape[2], pos, scale, y.data_ptr())
    if rc == -1:
        raise MemoryError("attend_step: out of memory for the attention scores")
    return y


def attend_prefill(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                   sin_signed: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
                   scale: float) -> torch.Tensor | None:
    """A prompt's attention, all fp32 on CPU: T new tokens of one sequence (`qkv` (T, >= (H + 2 KV) hd), rows may
    be a slice of a wider projection output; rotated in place) at positions pos..pos+T-1, each as attend_step's
    row at its own position (`cos`, `sin_signed`: (T, rd), those positions' rows), the token at pos + i seeing
    positions 0..pos+i; k and v written into the caches (1, KV, max_len, hd) -> (T, H hd). None where the kernel
    cannot serve the call (not built, other dtypes or layouts): use torch."""
    lib = _load()
    T = qkv.shape[0]
    if lib is None or not _attend_serves(qkv, cos, sin_signed, k_cache, v_cache) or k_cache.shape[0] != 1:
        return None
    if qkv.shape[1] < (num_heads + 2 * num_kv_heads) * head_dim or num_heads % num_kv_heads \
            or tuple(k_cache.shape) != (1, num_kv_heads, k_cache.shape[2], head_dim) \
            or v_cache.shape != k_cache.shape or not 0 <= pos <= pos + T <= k_cache.shape[2] \
            or cos.shape != sin_signed.shape or cos.shape[0] != T or cos.shape[1] > head_dim:
        raise ValueError("attend_prefill: shapes do not match the heads, the positions and the cache")
    y = torch.empty(T, num_heads * head_dim)
    rc = lib.attend_prefill(qkv.data_ptr(), T, qkv.stride(0), num_heads, num_kv_heads, head_dim, cos.shape[1],
                            cos.data_ptr(), sin_signed.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                            int(k_cache.dtype == torch.float16), k_cache.shape[2], pos, scale, y.data_ptr())
    if rc == -1:
        raise MemoryError("attend_prefill: out of memory for the attention scores")
    return y


def gelu_rows(x: torch.Tensor, approximate: str) -> torch.Tensor | None:
    """GELU (`approximate` "tanh" or "none", as F.gelu) of a 2-D fp32 CPU tensor whose rows may be strided (e.g.
    the fc1 columns of a fused projection's output) into a new contiguous tensor, with the numbers of the native
    decode steps (within a few ulp of torch's); None where the kernel is not built or cannot serve x."""
    lib = _load()
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.ndim != 2 or x.stride(1) != 1 \
            or x.shape[0] > 1 and x.stride(0) < x.shape[1] or approximate not in ("tanh", "none"):
        return None
    M, N = x.shape
    y = torch.empty(M, N)
    lib.gelu_rows(x.data_ptr(), x.stride(0), M, N, y.data_ptr(), int(approximate == "tanh"))
    return y


class _Layer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("d", "H", "KV", "hd", "rd", "inter", "gelu_tanh", "fmt")] + \
        [("eps", ctypes.c_float), ("scale", ctypes.c_float)] + \
        [(n, ctypes.c_void_p) for n in ("ln_w", "ln_b", "q1", "s1", "b1", "qd", "sd", "bd", "q2", "s2", "b2")]


Q8Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # int8 codes (N, K), fp32 row scales, fp32 bias
Q4Parts = tuple[Q4Weight, torch.Tensor | None]  # q4 weight (N, K), fp32 bias


class NativeLayer:
    """One decoder layer of an int8 or int4 model for decode.c's decode_layers: x (B, d) fp32 is updated in place,
    x += dense(attn) + fc2(gelu(fc1(LayerNorm(x)))), and the layer's k, v written into the cache. Weights, all in
    one format: int8 (codes, fp32 row scales, fp32 bias or None) or q4 (Q4Weight, fp32 bias or None), of q|k|v|fc1
    fused (rows in that order), dense, fc2. Built once per decode plan and run by a NativeStack; it holds
    pointers, so the tensors must stay as they are."""

    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, intermediate: int,
                 eps: float, scale: float, gelu_tanh: bool, ln_w: torch.Tensor, ln_b: torch.Tensor,
                 proj: Q8Parts | Q4Parts, dense: Q8Parts | Q4Parts, fc2: Q8Parts | Q4Parts) -> None:
        self.lib = _load()
        if self.lib is None:
            raise RuntimeError(f"native kernels unavailable: {_why_not}")
        d, Hh = ln_w.numel(), num_heads * head_dim
        shapes = {"proj": (proj, ((num_heads + 2 * num_kv_heads) * head_dim + intermediate, d)),
                  "dense": (dense, (d, Hh)), "fc2": (fc2, (d, intermediate))}
        fmt = int(isinstance(proj[0], Q4Weight))
        ptrs = {}
        for name, (parts, shape) in shapes.items():
            if fmt:
                if len(parts) != 2 or not isinstance(parts[0], Q4Weight):
                    raise ValueError(f"NativeLayer: {name} is not a q4 weight like proj's")
                wq, b = parts
                _q4_check(wq, b)
                if (wq.packed.shape[0], wq.K) != shape:
                    raise ValueError(f"NativeLayer: {name} needs a q4 weight of shape {shape}")
                ptrs[name] = (wq.packed.data_ptr(), wq.scales.data_ptr(), None if b is None else b.data_ptr())
                continue
            q, sc, b = parts
            if q.dtype != torch.int8 or tuple(q.shape) != shape or sc.dtype != torch.float32 \
                    or sc.numel() != shape[0] or b is not None and (b.dtype != torch.float32 or b.numel() != shape[0]) \
                    or not (q.is_contiguous() and sc.is_contiguous() and (b is None or b.is_contiguous())):
                raise ValueError(f"NativeLayer: {name} needs contiguous int8 {shape} with fp32 scales/bias")
            ptrs[name] = (q.data_ptr(), sc.data_ptr(), None if b is None else b.data_ptr())
        ln_w, ln_b = ln_w.detach().float().contiguous(), ln_b.detach().float().contiguous()
        self.keep = (ln_w, ln_b, proj, dense, fc2)
        self.shape = (d, num_heads, num_kv_heads, head_dim, fmt)
        self.format = ("int8", "int4")[fmt]
        (q1, s1, b1), (qd, sd, bd), (q2, s2, b2) = ptrs["proj"], ptrs["dense"], ptrs["fc2"]
        self.st = _Layer(d=d, H=num_heads, KV=num_kv_heads, hd=head_dim, rd=rotary_dim, inter=intermediate,
                         gelu_tanh=int(gelu_tanh), fmt=fmt, eps=eps, scale=scale, ln_w=ln_w.data_ptr(),
                         ln_b=ln_b.data_ptr(), q1=q1, s1=s1, b1=b1, qd=qd, sd=sd, bd=bd, q2=q2, s2=s2, b2=b2)


class NativeStack:
    """Consecutive NativeLayers (a decode step's whole decoder stack) in one native call, decode.c's decode_layers:
    each call from Python costs microseconds, ~5 % of a 100M int8 model's step when made once a layer, and the
    torch ops between an int4 model's matmuls (LayerNorm, GELU, adds) cost ~6 % of a phi-2 step."""

    def __init__(self, layers: list[NativeLayer]) -> None:
        if not layers or any(layer.shape != layers[0].shape for layer in layers):
            raise ValueError("NativeStack: needs one or more layers of the same shape and format")
        self.lib, self.layers, self.n = layers[0].lib, layers, len(layers)  # `layers` keeps their tensors alive
        self.d, _, self.KV, self.hd, _ = layers[0].shape
        self.format = layers[0].format
        self.structs = (_Layer * self.n)(*(layer.st for layer in layers))  # copies; caches filled in per call
        self.kc, self.vc = (ctypes.c_void_p * self.n)(), (ctypes.c_void_p * self.n)()

    def __call__(self, x: torch.Tensor, pos: int, cos: torch.Tensor, sin_signed: torch.Tensor,
                 k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> int:
        """Run the layers on x (B, d) in place at cache position `pos`, layer i on k_caches[i] and v_caches[i]
        (B, KV, max_len, hd), all fp32 or all fp16. Returns how many layers ran: all of them; i when layer i
        declined (inf/NaN in an activation; x is as layer i found it); 0 when the stack cannot serve the call (more
        than MAX_ROWS rows, other dtypes or layouts). The caller runs the rest its own way."""
        B = x.shape[0]
        shape = (B, self.KV, k_caches[0].shape[2], self.hd)
        if B > MAX_ROWS or x.dtype != torch.float32 or x.shape != (B, self.d) or not x.is_contiguous() \
                or not 0 <= pos < shape[2] \
                or len(k_caches) != self.n or len(v_caches) != self.n \
                or k_caches[0].dtype not in KV_DTYPES \
                or not all(t.dtype == k_caches[0].dtype and t.is_contiguous() and t.shape == shape
                           for ts in (k_caches, v_caches) for t in ts):
            return 0
        self.kc[:] = [t.data_ptr() for t in k_caches]
        self.vc[:] = [t.data_ptr() for t in v_caches]
        ran = self.lib.decode_layers(self.structs, self.n, self.kc, self.vc, int(k_caches[0].dtype == torch.float16),
                                     shape[2], x.data_ptr(), B, pos, cos.data_ptr(), sin_signed.data_ptr())
        if ran < 0:
            raise MemoryError("decode_layers: out of memory")
        return ran
