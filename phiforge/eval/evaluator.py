"""Run tasks on a model: load data, send the batched requests through the on-disk cache, collect metrics.

`evaluate(lm, ["arc_easy", "piqa"], limit=200)` returns a JSON-ready dict:
    {"config": {...everything that determines the numbers...},
     "results": {task: {"metrics": {m: value, m + "_stderr": se}, "n": items, "version": v, "source": file,
                        "prompt_format": ..., "num_fewshot": k, "notes": [...], ...}},
     "samples": {task: [...]}   # only with log_samples
     "cache": {"hits": h, "misses": m}}
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from phiforge.eval.cache import CachedLM, ResultCache
from phiforge.eval.lm import LM
from phiforge.eval.tasks import get_task
from phiforge.eval.tasks.base import limit_docs
from phiforge.eval.tasks.generation import BBHTask, limit_per_subtask
from phiforge.eval.tasks.multiple_choice import MMLUTask
from phiforge.eval.tasks.toxigen import ToxiGenTask


def default_cache_path() -> Path:
    base = os.environ.get("PHIFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "phiforge")
    return Path(base) / "eval_cache.sqlite"


def evaluate(lm: LM, tasks: list[str], *, num_fewshot: int | None = None, limit: int | None = None,
             data_dir: str | os.PathLike | None = None, cache_path: str | os.PathLike | None = None,
             use_cache: bool = True, log_samples: bool = False, allow_hub: bool = True, model_spec: str = "",
             task_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate `lm` on `tasks`; see the module docstring for the result layout."""
    import phiforge

    cache = ResultCache(cache_path or default_cache_path()) if use_cache else None
    opts = dict(task_options or {})
    out: dict[str, Any] = {
        "config": {"model": model_spec or lm.identity, "model_identity": lm.identity,
                   "backend": type(lm).__name__, "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit,
                   "batch_size": getattr(lm, "batch_size", None), "data_dir": str(data_dir) if data_dir else None,
                   "cache": str(cache.path) if cache else None, "task_options": opts,
                   "phiforge_version": phiforge.__version__, "python": platform.python_version(),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "results": {}, "samples": {}}
    hits = misses = 0
    try:
        for name in tasks:
            task = get_task(name)
            docs, source = task.load(data_dir, allow_hub=allow_hub)
            if isinstance(task, BBHTask):  # --limit per subtask, as lm-eval does for task groups
                docs = limit_per_subtask(docs, limit, "task")
            elif isinstance(task, MMLUTask):
                docs = limit_per_subtask(docs, limit, "subject")
            elif not isinstance(task, ToxiGenTask):
                docs = limit_docs(docs, limit)
            cached = CachedLM(lm, cache, desc=name)
            t0 = time.perf_counter()
            kw = dict(opts)
            if isinstance(task, ToxiGenTask):
                kw["limit"] = limit
            res = task.run(cached, docs, num_fewshot=num_fewshot, log_samples=log_samples, data_dir=data_dir,
                           **kw)
            k = task.num_fewshot if num_fewshot is None else num_fewshot
            metrics: dict[str, float] = {}
            for m, (v, se) in res.metrics.items():
                metrics[m] = v
                metrics[f"{m}_stderr"] = se
            out["results"][name] = {"metrics": metrics, "n": res.n, "version": task.version, "kind": task.kind,
                                    "prompt_format": task.prompt_format, "num_fewshot": k, "source": source,
                                    "notes": res.notes, "seconds": round(time.perf_counter() - t0, 2),
                                    "cache": dict(cached.stats), **res.extra}
            if log_samples:
                out["samples"][name] = res.samples
            hits += cached.stats["hits"]
            misses += cached.stats["misses"]
    finally:
        if cache is not None:
            cache.close()
    return finish_results(out, hits, misses, log_samples)


def finish_results(out: dict[str, Any], hits: int, misses: int, log_samples: bool) -> dict[str, Any]:
    """The last touches of a results dict (eval and strategies alike): cache totals; samples only if logged."""
    out["cache"] = {"hits": hits, "misses": misses}
    if not log_samples:
        out.pop("samples")
    return out


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: task, version, shots, n, metric, value, stderr (percent for 0-1 metrics)."""
    rows = [("task", "version", "shots", "n", "metric", "value", "stderr")]
    for name, r in results["results"].items():
        first = True
        for m, v in r["metrics"].items():
            if m.endswith("_stderr") or "_score_" in m:
                continue
            se = r["metrics"].get(f"{m}_stderr", float("nan"))
            rows.append((name if first else "", r["version"] if first else "", str(r["num_fewshot"]) if first else "",
                         str(r["n"]) if first else "", m, f"{100 * v:.2f}", f"{100 * se:.2f}"))
            first = False
        for note in r.get("notes", []):
            rows.append(("", "", "", "", "note", note, ""))
    widths = [max(len(row[i]) for row in rows if row[4] != "note" or i < 4) for i in range(7)]
    lines = []
    for j, row in enumerate(rows):
        if row[4] == "note":
            lines.append(" " * (sum(widths[:4]) + 8) + "note: " + row[5])
            continue
        lines.append("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
