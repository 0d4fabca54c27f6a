"""Training metrics: the JSONL log, optional TensorBoard, and model FLOPs utilisation (MFU).

MFU = achieved FLOP/s / peak FLOP/s, with FLOPs per token = 6N + 12*L*d*T (ModelConfig.flops_per_token, PaLM
Appendix B; N excludes the token embedding, which is a lookup). The GPU peak comes from a table of dense
bf16/fp16 tensor-core figures by device name; a CPU has no datasheet number we can trust, so its peak is
*measured* once (a large matmul in the training dtype at the current thread count) and cached.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import IO, Any

import torch

# Dense (no sparsity) peak FLOP/s per GPU for bf16/fp16 tensor cores; fp32 runs use tf32 figures/2 roughly, so
# we report MFU against the bf16 figure as is customary (nanoGPT, llm.c, torchtitan).
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def gpu_peak_flops(name: str) -> float | None:
    """Peak bf16 FLOP/s for a CUDA device name ('NVIDIA H100 80GB HBM3' -> 989e12); None if unknown."""
    for key, value in GPU_PEAK_BF16.items():  # more specific keys come first
        if key.lower() in name.lower():
            return value
    return None


def _cache_file() -> Path:
    base = os.environ.get("PHIFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "phiforge")
    return Path(base) / "cpu_peak.json"


def measure_cpu_peak(dtype: torch.dtype = torch.float32, seconds: float = 0.3, n: int = 1024) -> float:
    """FLOP/s of an n x n matmul on this CPU at the current torch thread count (best of several runs), by the
    fastest library torch has for it: torch.mm (MKL for fp32) and, for fp32, oneDNN (train/onednn.py), which
    is ~2x faster on AMD CPUs; an MFU against the slower one would overstate the model's use of the machine."""
    from phiforge.train import onednn

    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    fns = [lambda: torch.mm(a, b)]
    if dtype == torch.float32 and onednn.available():
        fns.append(lambda: onednn.matmul_nn(a, b))
    best = 0.0
    for fn in fns:
        fn()  # warm up (thread pool, packing buffers)
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            for _ in range(4):
                fn()
            dt = time.perf_counter() - t0
            best = max(best, 4 * 2 * n**3 / dt)
    return best


def cpu_peak_flops(dtype: torch.dtype = torch.float32, refresh: bool = False) -> float:
    """The measured CPU peak for `dtype` and the current thread count, cached in ~/.cache/phiforge/.

    A measurement taken while the machine was busy comes out low; `refresh` measures again and the cache keeps
    the highest rate ever seen (the trainer refreshes once if it ever computes an MFU above 100%)."""
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{torch.get_num_threads()}|{dtype}|onednn"
    path = _cache_file()
    cache: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        cache = json.loads(path.read_text())
    if key in cache and not refresh:
        return float(cache[key])
    peak = max(measure_cpu_peak(dtype), float(cache.get(key, 0.0)))
    cache[key] = peak
    try:
        from phiforge.atomic import atomic_write_json

        atomic_write_json(path, cache)
    except OSError:
        pass  # a read-only home is fine: we measure again next time
    return peak


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device: the GPU table by name, or the measured CPU matmul rate."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return cpu_peak_flops(dtype)
    return None


class MetricsLog:
    """Append JSON records to `log.jsonl` (flushed per record, so a killed run keeps what it logged) and,
    optionally, scalars to TensorBoard."""

    def __init__(self, path: Path, *, tensorboard_dir: Path | None = None, truncate_after: int | None = None
                 ) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and path.exists():
            # Resuming from step k: records of steps after k (from the interrupted run) are replayed, drop them.
            text = path.read_text(encoding="utf-8", errors="replace")  # a damaged line is dropped, not a crash
            kept = [line for line in text.splitlines() if _step_of(line) <= truncate_after]
            from phiforge.atomic import atomic_write_text

            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif truncate_after is None and path.exists():
            path.unlink()
        self.file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k not in ("step", "type") and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{record.get('type', 'train')}/{k}", v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> float:
    """The step of a log line; a torn last line (the run was killed mid-write), or any line that is not a
    record, sorts after everything."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return float("inf")
    step = rec.get("step", 0) if isinstance(rec, dict) else None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else float("inf")


def read_log(path: str | os.PathLike, type_: str = "train") -> list[dict[str, Any]]:
    """The records of one type from a log.jsonl, in order."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("type") == type_:
                out.append(rec)
    return out
