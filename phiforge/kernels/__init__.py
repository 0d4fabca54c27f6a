"""Optional native CPU kernels, built on first use with the machine's C compiler; torch paths otherwise.

There is one: `q8_linear`, y = x @ (q * scale)^T + bias for int8 weights at small batch (see q8_linear.c for
the method and its error). Batch-1 decoding of an int8 model is a matrix-vector product per layer, and torch's
own `_weight_int8pack_mm` is compute-bound there (~15 GB/s of weights a core, measured on torch 2.13 with
AVX-512); this kernel multiplies in exact integer arithmetic and streams at memory speed (bench/serve.py).

Build: `cc -O3 -march=native -fopenmp -shared -fPIC` (CC overrides the compiler; without OpenMP support it is
built single-threaded) into PHIFORGE_KERNEL_CACHE (default ~/.cache/phiforge/kernels), keyed by a hash of the
source, flags, compiler and CPU, written atomically (concurrent first uses are safe). No compiler, a failed
build: `available()` is False, one warning says why, and callers use torch's kernels (PHIFORGE_KERNELS=0: the
same, silently).
Nothing here is imported by `import phiforge`; the build runs on the first call only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("q8_linear.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
MAX_ROWS = 16  # above this many activation rows (prefill), torch's batched kernels win
ISA_NAMES = {3: "AVX-512 VNNI", 2: "AVX-512BW", 1: "AVX2", 0: "portable C"}

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
                out = cache_dir() / f"q8_linear-{key}.so"
                if not out.exists():
                    out.parent.mkdir(parents=True, exist_ok=True)
                    _why_not = _compile(cc, out)
                if not _why_not:
                    lib = ctypes.CDLL(str(out))
                    lib.q8_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_int]
                    lib.q8_linear.restype = ctypes.c_int
                    lib.q8_isa.restype = ctypes.c_int
                    _lib = lib
            except (OSError, subprocess.SubprocessError) as e:
                _why_not = f"{type(e).__name__}: {e}"
        if _lib is None:  # said once: a failed build is worth knowing about, a slower path is not an error
            warnings.warn(f"phiforge: native int8 kernel unavailable ({_why_not}); using torch's kernels",
                          RuntimeWarning, stacklevel=3)
        return _lib


def available() -> bool:
    """Whether the native kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def describe() -> str:
    """One line for reports: which instruction set the kernel uses, or why it is not in use."""
    lib = _load()
    return f"native int8 kernel ({ISA_NAMES.get(lib.q8_isa(), '?')})" if lib else f"torch kernels ({_why_not})"


def q8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor | None:
    """x (M, K) -> (M, N) = x @ (q * scale[:, None])^T + bias in `out_dtype` (fp32 or bf16), for CPU int8 `q`
    (N, K), fp32 `scale` (N,) and fp32 `bias` (N,) or None, all contiguous. None where the kernel cannot serve
    the call (not built, more than MAX_ROWS rows, another dtype or device, inf/NaN in x): use torch instead."""
    lib = _load()
    M, K = x.shape
    if lib is None or M > MAX_ROWS or x.device.type != "cpu" or out_dtype not in (torch.float32, torch.bfloat16):
        return None
    if q.dtype != torch.int8 or scale.dtype != torch.float32 or bias is not None and bias.dtype != torch.float32 \
            or q.shape[1] != K or not (q.is_contiguous() and scale.is_contiguous()):
        raise ValueError("q8_linear: needs contiguous int8 q (N, K) and fp32 scale/bias (N,)")
    x = x.float().contiguous()
    y = torch.empty(M, q.shape[0], dtype=out_dtype)
    rc = lib.q8_linear(x.data_ptr(), M, K, q.data_ptr(), scale.data_ptr(),
                       None if bias is None else bias.data_ptr(), y.data_ptr(), q.shape[0],
                       int(out_dtype == torch.bfloat16))
    if rc == -1:
        raise MemoryError("q8_linear: out of memory for the quantized activations")
    return y if rc == 0 else None
