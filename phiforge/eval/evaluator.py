"""Run tasks on a model: find every task's data first, send the batched requests through the on-disk cache,
collect metrics in a results file that says what ran.

    data = prepare(["arc_easy", "mmlu"], data_dir=None)     # before any model loads: one DataError if missing
    results = evaluate(lm, ["arc_easy", "mmlu"], limit=200, data=data, model_spec="smollm2")

The results dict is laid out as lm-evaluation-harness writes its own, so lm-eval's tooling reads it:

    results         {task: {"alias": task, "acc,none": v, "acc_stderr,none": se, ...}}
    configs         {task: dataset path/name/split, output type, num_fewshot, metrics, version, prompt format,
                     "data": [{kind, where, rows, sha256, dataset, config, split}], "data_sha256", and for code
                     tasks "sandbox" (the sandbox's mode and limits)}
    versions, n-shot, higher_is_better, n-samples   {task: ...}
    samples         {task: [per-sample logs]}               (only with log_samples)
    config          model spec and identity (backend, weights' sha256, dtype, quantization), package versions,
                    limit, batch size, data dir, cache, options, date
    tasks           phiforge's own view per task: {"metrics": {m: v, m + "_stderr": se}, "n", "version", "source",
                    "prompt_format", "num_fewshot", "notes", "seconds", "cache", subjects/groups/...}
    cache           {"hits": h, "misses": m}
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from phiforge.errors import DataError, PhiforgeError
from phiforge.eval.data import MissingData, combined_sha256, missing_message
from phiforge.eval.tasks import get_task
from phiforge.eval.tasks.base import TaskData
from phiforge.lm.base import LM
from phiforge.lm.cache import CachedLM, ResultCache


def default_cache_path() -> Path:
    base = os.environ.get("PHIFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "phiforge")
    return Path(base) / "eval_cache.sqlite"


def split_subjects(tasks: list[str], subjects: list[str] | None) -> dict[str, list[str] | None]:
    """`--subjects` per task: each task with subtasks (MMLU, BBH) gets the subjects it knows; a subject no task
    knows, or a task with subtasks that gets none of them, is an error."""
    out: dict[str, list[str] | None] = {name: None for name in tasks}
    if not subjects:
        return out
    used: set[str] = set()
    capable = [n for n in tasks if get_task(n).subjects()]
    if not capable:
        raise PhiforgeError(f"--subjects applies to mmlu and bbh; none of {', '.join(tasks)} has subtasks")
    for name in capable:
        known = get_task(name).subjects() or []
        mine = [s for s in subjects if s in known]
        if not mine:
            raise PhiforgeError(f"--subjects: none of {', '.join(subjects)} is a {name} subtask (e.g. "
                                f"{', '.join(known[:3])}; `phiforge eval --tasks list` lists the tasks)")
        out[name] = mine
        used.update(mine)
    unknown = [s for s in subjects if s not in used]
    if unknown:
        raise PhiforgeError(f"--subjects: {unknown[0]!r} is not a subtask of {', '.join(capable)}")
    return out


def prepare(tasks: list[str], *, data_dir: str | os.PathLike | None = None, allow_hub: bool = True,
            subjects: list[str] | None = None) -> dict[str, TaskData]:
    """Every task's data, found before any model is loaded. Tasks without data make ONE DataError line that
    names them all, the real cause and the one command that fixes it."""
    per = split_subjects(tasks, subjects)
    out: dict[str, TaskData] = {}
    missing: list[MissingData] = []
    for name in tasks:
        try:
            out[name] = get_task(name).fetch(data_dir, allow_hub, per[name])
        except MissingData as e:
            missing.append(e)
    if missing:
        raise DataError(missing_message(missing))
    return out


def evaluate(lm: LM, tasks: list[str], *, num_fewshot: int | None = None, limit: int | None = None,
             data_dir: str | os.PathLike | None = None, cache_path: str | os.PathLike | None = None,
             use_cache: bool = True, log_samples: bool = False, allow_hub: bool = True, model_spec: str = "",
             task_options: dict[str, Any] | None = None, data: dict[str, TaskData] | None = None,
             subjects: list[str] | None = None) -> dict[str, Any]:
    """Evaluate `lm` on `tasks` (their data from `data`, else `prepare`d here); see the module docstring."""
    from phiforge.eval.results import lm_eval_task_entry, model_identity, package_versions

    data = data if data is not None else prepare(tasks, data_dir=data_dir, allow_hub=allow_hub, subjects=subjects)
    cache = ResultCache(cache_path or default_cache_path()) if use_cache else None
    opts = dict(task_options or {})
    out: dict[str, Any] = {
        "results": {}, "configs": {}, "versions": {}, "n-shot": {}, "higher_is_better": {}, "n-samples": {},
        "samples": {},
        "config": {"model": model_spec or lm.identity, "model_identity": model_identity(lm, model_spec),
                   "cache_identity": lm.identity, "backend": type(lm).__name__, "tasks": tasks,
                   "num_fewshot": num_fewshot, "limit": limit, "subjects": subjects,
                   "batch_size": getattr(lm, "batch_size", None), "data_dir": str(data_dir) if data_dir else None,
                   "allow_hub": allow_hub, "cache": str(cache.path) if cache else None, "task_options": opts,
                   "versions": package_versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "tasks": {}}
    hits = misses = 0
    try:
        for name in tasks:
            task = get_task(name)
            td = data[name]
            docs = task.select(td.docs, limit)
            cached = CachedLM(lm, cache, desc=name)
            t0 = time.perf_counter()
            res = task.run(cached, docs, num_fewshot=num_fewshot, log_samples=log_samples, data_dir=data_dir,
                           **({"pool": td.pool} if td.pool is not None else {}), **opts)
            k = task.num_fewshot if num_fewshot is None else num_fewshot
            metrics: dict[str, float] = {}
            for m, (v, se) in res.metrics.items():
                metrics[m] = v
                metrics[f"{m}_stderr"] = se
            sources = [s.as_dict() for s in td.sources]
            data_sha = combined_sha256(td.sources)
            out["tasks"][name] = {"metrics": metrics, "n": res.n, "version": task.version, "kind": task.kind,
                                  "prompt_format": task.prompt_format, "num_fewshot": k, "source": td.where,
                                  "data_sha256": data_sha, "notes": td.notes + res.notes,
                                  "seconds": round(time.perf_counter() - t0, 2), "cache": dict(cached.stats),
                                  **res.extra}
            out["results"][name] = lm_eval_task_entry(name, res.metrics)
            out["configs"][name] = {**task.lm_eval_config(k), "data": sources, "data_sha256": data_sha,
                                    **({"sandbox": res.extra["sandbox"]} if "sandbox" in res.extra else {})}
            out["versions"][name] = task.version
            out["n-shot"][name] = k
            out["higher_is_better"][name] = {m: True for m in res.metrics}
            out["n-samples"][name] = {"original": len(td.docs), "effective": len(docs)}
            if log_samples:
                out["samples"][name] = [{"doc_id": i, **s} for i, s in enumerate(res.samples)]
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
    for name, r in results["tasks"].items():
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
