"""The curation pipeline: a YAML list of steps run over shards by a local or Ray executor, resumably.

Steps are of two kinds:
- per-document (`text`, `python`, `edu`, `decontaminate`): consecutive ones run fused in one *map stage*,
  each shard independently;
- global (`exact_dedup`, `minhash`): three phases as datatrove's stages — per-shard keys/signatures
  (parallel), one global clustering in the driver, then per-shard filtering (parallel).

Layout of the output directory:
    OUT/<shard>.jsonl             the curated records (unchanged JSON objects, input order)
    OUT/stats/<k>-<step>.json     kept / removed per reason (+ bad records with file:line, + hits)
    OUT/removed/<k>-<step>.jsonl  the first `sample_removed` removed records of the step, with reason
    OUT/stats.json                summary of every step
    OUT/decontamination.json      which documents hit which benchmark items (when that step runs)
    OUT/.work/                    per-stage shard outputs and done markers (resume state)
A (stage, shard) is done when its stats file exists: written atomically after the shard's output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiforge.atomic import atomic_open, atomic_write_json
from phiforge.data.curate.filters import PythonFilter, TextFilter
from phiforge.data.curate.shards import BadRecord, Record, expand_inputs, read_records, shard_names
from phiforge.errors import ConfigError, DataError
from phiforge.readers import iter_jsonl, read_json

MAX_BAD_LISTED = 100  # bad records listed by file:line per stats file (all are counted)


# ---------------------------------------------------------------------------------------------- config


@dataclass
class EduStep:
    """Keep documents whose predicted educational value (0-5) is >= threshold."""

    threshold: float = 3.0
    classifier: str = "default"  # "default" (Python stdlib classifier, trained at first use) or a directory
    batch_size: int = 64
    score_field: str | None = None  # when set, the score is written into kept records under this key


@dataclass
class ExactDedupStep:
    """Remove exact duplicates (after whitespace normalisation, optionally lower-cased); keep the first."""

    lowercase: bool = False


@dataclass
class MinHashStep:
    """MinHash-LSH near-duplicate removal over word n-gram shingles; keeps the lowest index per cluster."""

    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1
    threshold: float | None = 0.7  # verify candidates: estimated Jaccard >= threshold (None: LSH only)


@dataclass
class DecontamStep:
    """Remove documents sharing any `ngram`-gram with a benchmark item's prompt or answer."""

    ngram: int = 13
    benchmarks: list[str] = field(default_factory=lambda: ["humaneval", "mbpp"])
    data_dir: str | None = None


STEP_TYPES: dict[str, type] = {
    "text": TextFilter,
    "python": PythonFilter,
    "edu": EduStep,
    "exact_dedup": ExactDedupStep,
    "minhash": MinHashStep,
    "decontaminate": DecontamStep,
}
GLOBAL_STEPS = ("exact_dedup", "minhash")


@dataclass
class Step:
    type: str
    name: str
    params: Any


@dataclass
class CurateConfig:
    """A curation recipe (YAML): input field names, executor, and the ordered steps."""

    steps: list[Step]
    text_field: str = "text"
    id_field: str | None = "id"
    executor: str = "local"  # local | ray
    workers: int = 0  # local: processes (0 = min(cpus, shards)); ray: ignored
    ray_address: str | None = None
    sample_removed: int = 20

    def fingerprint(self) -> str:
        d = dataclasses.asdict(self)
        for k in ("executor", "workers", "ray_address"):  # how it runs does not change what it makes
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(cls: type, params: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    for k in params:
        if k not in names:
            raise ConfigError(f"{where}: unknown key {k!r} (known: {', '.join(sorted(names))})")
    try:
        obj = cls(**params)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if f.name in params and isinstance(f.default, (int, float)) and not isinstance(f.default, bool) \
                and v is not None and not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: {f.name} must be a number, got {v!r}")
    return obj


def parse_config(data: dict, where: str = "config") -> CurateConfig:
    """A CurateConfig from a YAML mapping; unknown keys and step types are errors naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    data = dict(data)
    raw_steps = data.pop("steps", None)
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError(f"{where}: 'steps' must be a non-empty list")
    steps: list[Step] = []
    for i, s in enumerate(raw_steps):
        sw = f"{where}: steps[{i}]"
        if not isinstance(s, dict) or "type" not in s:
            raise ConfigError(f"{sw}: each step is a mapping with a 'type'")
        s = dict(s)
        typ = s.pop("type")
        name = str(s.pop("name", typ))
        if typ not in STEP_TYPES:
            raise ConfigError(f"{sw}: unknown step type {typ!r} (known: {', '.join(STEP_TYPES)})")
        steps.append(Step(typ, name, _build(STEP_TYPES[typ], s, sw)))
    if len({s.name for s in steps}) != len(steps):
        raise ConfigError(f"{where}: step names must be unique (set 'name:' on repeated types)")
    cfg = _build(CurateConfig, {"steps": steps, **data}, where)
    if cfg.executor not in ("local", "ray"):
        raise ConfigError(f"{where}: executor must be 'local' or 'ray', got {cfg.executor!r}")
    return cfg


def load_config(path: str | os.PathLike) -> CurateConfig:
    from phiforge.config import read_yaml

    return parse_config(read_yaml(path, what="curation settings"), str(path))


# ---------------------------------------------------------------------------------------------- executors


class LocalExecutor:
    """Runs tasks in a process pool (spawn: safe with torch), or in-process with one worker."""

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers

    def map(self, fn, tasks: list[dict], on_done=None) -> list:
        n = self.workers or min(os.cpu_count() or 1, len(tasks))
        out = []
        if n <= 1 or len(tasks) <= 1:
            for t in tasks:
                out.append(fn(t))
                if on_done:
                    on_done()
            return out
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(n) as pool:
            for r in pool.imap(fn, tasks, chunksize=1):  # in task order, as each finishes
                out.append(r)
                if on_done:
                    on_done()
        return out


class RayExecutor:
    """Runs the same task functions as Ray tasks (one CPU each) on a running or a new local Ray cluster."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def map(self, fn, tasks: list[dict], on_done=None) -> list:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=1)(fn)
        refs = [remote.remote(t) for t in tasks]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            if on_done:
                on_done()
        return ray.get(refs)  # in task order


def make_executor(cfg: CurateConfig):
    return RayExecutor(cfg.ray_address) if cfg.executor == "ray" else LocalExecutor(cfg.workers)


# ---------------------------------------------------------------------------------------------- shard I/O


def _iter_stage_input(task: dict):
    """(src, record) pairs of a shard for a stage, plus BadRecords when reading the raw input."""
    if task["input_is_raw"]:
        yield from read_records(task["input"], task["text_field"])
        return
    for n, w, reason in iter_jsonl(task["input"]):  # our own file: anything wrong is damage, not data
        if reason is not None or not isinstance(w, dict) or not {"src", "record"} <= w.keys():
            raise DataError(f"{task['input']}:{n}: damaged intermediate file ({reason or 'not a record'}); delete "
                            f"{Path(task['input']).parent.parent} and run the same command again")
        yield Record(w["src"], w["record"])


def _read_state(path: str | os.PathLike, *keys: str) -> dict | None:
    """One of the run's own JSON state files (an object with `keys`), or None when it is missing or damaged:
    its work is then redone."""
    try:
        state = read_json(path, what="curate state")
    except DataError:
        return None
    return state if all(k in state for k in keys) else None


def _doc_id(rec: Record, id_field: str | None) -> str:
    if id_field and id_field in rec.data and isinstance(rec.data[id_field], (str, int)):
        return str(rec.data[id_field])
    return rec.src


def _new_stats(step: Step) -> dict:
    return {"step": step.name, "type": step.type, "input": 0, "kept": 0, "removed": {}}


def _remove(stats: dict, samples: list, limit: int, rec: Record, reason: str, **extra) -> None:
    stats["removed"][reason] = stats["removed"].get(reason, 0) + 1
    if len(samples) < limit:
        samples.append({"src": rec.src, "reason": reason, **extra, "record": rec.data})


def _write_outputs(task: dict, kept: list[Record], stats: list[dict], samples: list[list]) -> dict:
    """Write the shard's records, then its stats file (the done marker) — both atomically."""
    with atomic_open(task["output"], "w", encoding="utf-8") as f:
        for rec in kept:
            f.write(json.dumps({"src": rec.src, "record": rec.data}, ensure_ascii=False) + "\n")
    result = {"stats": stats, "samples": samples}
    atomic_write_json(task["done"], result, indent=None)
    return result


def _count_bad(stats0: dict, bad: BadRecord, strict: bool = False) -> None:
    if strict:
        raise DataError(f"{bad.src}: {bad.error} (--strict stops at the first bad record; without it, bad "
                        f"records are skipped and listed)")
    stats0["bad_records"] = stats0.get("bad_records", 0) + 1
    listed = stats0.setdefault("bad_examples", [])
    if len(listed) < MAX_BAD_LISTED:
        listed.append(f"{bad.src}: {bad.error}")


# ---------------------------------------------------------------------------------------------- per-doc steps

_CLASSIFIERS: dict[str, Any] = {}  # per-process cache: path -> loaded classifier
_INDEXES: dict[str, Any] = {}  # per-process cache: path -> NgramIndex


def _make_filter(step: Step, task: dict):
    """A batch function texts -> list of (reason | None, extra dict) for one per-document step."""
    p = step.params
    if step.type in ("text", "python"):
        return lambda texts: [(p(t), {}) for t in texts]
    if step.type == "edu":
        path = task["resources"][step.name]
        if path not in _CLASSIFIERS:
            from phiforge.data.curate.classifier import load_classifier

            _CLASSIFIERS[path] = load_classifier(path)
        clf = _CLASSIFIERS[path]

        def edu(texts: list[str]):
            scores = clf.score(texts, batch_size=p.batch_size)
            return [(None if s >= p.threshold else "low_edu_score", {"edu_score": round(float(s), 4)})
                    for s in scores]
        return edu
    if step.type == "decontaminate":
        path = task["resources"][step.name]
        if path not in _INDEXES:
            from phiforge.data.curate.decontam import NgramIndex

            _INDEXES[path] = NgramIndex.load(path)
        index = _INDEXES[path]

        def decont(texts: list[str]):
            hits = index.hits(texts)
            return [(("benchmark_overlap", {"hits": [list(h) for h in hs]}) if hs else (None, {})) for hs in hits]
        return decont
    raise AssertionError(step.type)


def run_map_shard(task: dict) -> dict:
    """One shard through a fused run of per-document steps."""
    steps: list[Step] = task["steps"]
    stats = [_new_stats(s) for s in steps]
    samples: list[list] = [[] for _ in steps]
    fns = [_make_filter(s, task) for s in steps]
    limit, tf = task["sample_removed"], task["text_field"]
    kept: list[Record] = []
    batch: list[Record] = []

    def flush() -> None:
        alive = batch
        for k, (step, fn) in enumerate(zip(steps, fns)):
            if not alive:
                break
            stats[k]["input"] += len(alive)
            verdicts = fn([r.data[tf] for r in alive])
            nxt = []
            for rec, (reason, extra) in zip(alive, verdicts):
                if reason is None:
                    if step.type == "edu" and step.params.score_field:
                        rec.data[step.params.score_field] = extra["edu_score"]
                    nxt.append(rec)
                else:
                    if step.type == "decontaminate":
                        stats[k].setdefault("hits", {})[_doc_id(rec, task["id_field"])] = extra["hits"]
                    _remove(stats[k], samples[k], limit, rec, reason, **extra)
            stats[k]["kept"] += len(nxt)
            alive = nxt
        kept.extend(alive)
        batch.clear()

    for item in _iter_stage_input(task):
        if isinstance(item, BadRecord):
            _count_bad(stats[0], item, task.get("strict", False))
            continue
        batch.append(item)
        if len(batch) >= 256:
            flush()
    flush()
    return _write_outputs(task, kept, stats, samples)


# ---------------------------------------------------------------------------------------------- global steps


def _exact_key(text: str, lowercase: bool) -> bytes:
    t = " ".join(text.split())
    return hashlib.blake2b((t.lower() if lowercase else t).encode("utf-8", "replace"), digest_size=16).digest()


def run_signature_shard(task: dict) -> dict:
    """Phase 1 of a global step: per-document keys (exact) or MinHash signatures (near-dup) of one shard."""
    step: Step = task["step"]
    srcs: list[str] = []
    texts: list[str] = []
    stats0: dict = {}
    for item in _iter_stage_input(task):
        if isinstance(item, BadRecord):
            _count_bad(stats0, item, task.get("strict", False))
            continue
        srcs.append(item.src)
        texts.append(item.data[task["text_field"]])
    if step.type == "exact_dedup":
        sig = np.frombuffer(b"".join(_exact_key(t, step.params.lowercase) for t in texts), dtype=np.uint8)
        sig = sig.reshape(len(texts), 16)
    else:
        from phiforge.data.curate.minhash import LSHParams, minhash_signatures

        p = step.params
        sig = minhash_signatures(texts, LSHParams(p.ngram, p.bands, p.rows, p.seed))
    with atomic_open(task["sig"], "wb") as f:
        np.save(f, sig)
    atomic_write_json(task["sig"] + ".srcs.json", srcs, indent=None)
    atomic_write_json(task["done"], {"bad": stats0}, indent=None)
    return {"bad": stats0}


def cluster_global(step: Step, sigs: list[np.ndarray]) -> np.ndarray:
    """Global representative index per document (over all shards in order); kept iff rep == own index."""
    allsig = np.concatenate(sigs) if sigs else np.zeros((0, 1))
    n = len(allsig)
    if step.type == "exact_dedup":
        # first occurrence of each key
        _, first, inverse = np.unique(allsig.view(np.dtype((np.void, allsig.shape[1]))).ravel(),
                                      return_index=True, return_inverse=True)
        return first[inverse.ravel()].astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    from phiforge.data.curate.minhash import LSHParams, near_duplicate_clusters

    p = step.params
    root, _ = near_duplicate_clusters(allsig, LSHParams(p.ngram, p.bands, p.rows, p.seed, p.threshold))
    return root


def run_filter_shard(task: dict) -> dict:
    """Phase 3 of a global step: drop the shard's documents that are not their cluster's representative."""
    step: Step = task["step"]
    reason = "exact_duplicate" if step.type == "exact_dedup" else "near_duplicate"
    fix = f"delete {Path(task['remove']).parent.parent} and run the same command again"
    remove: dict[str, str] = read_json(task["remove"], what="curate state", fix=fix)
    stats = _new_stats(step)
    sig_done = read_json(task["sig_done"], what="curate state", fix=fix)
    if sig_done["bad"]:
        stats.update(sig_done["bad"])
    samples: list = []
    kept: list[Record] = []
    pos = 0
    for item in _iter_stage_input(task):
        if isinstance(item, BadRecord):
            continue  # counted in phase 1
        stats["input"] += 1
        dup_of = remove.get(str(pos))
        if dup_of is None:
            kept.append(item)
        else:
            _remove(stats, samples, task["sample_removed"], item, reason, duplicate_of=dup_of)
        pos += 1
    stats["kept"] = len(kept)
    return _write_outputs(task, kept, [stats], [samples])


# ---------------------------------------------------------------------------------------------- driver


def _stages(cfg: CurateConfig) -> list[list[Step]]:
    stages: list[list[Step]] = []
    for s in cfg.steps:
        if s.type in GLOBAL_STEPS or not stages or stages[-1][0].type in GLOBAL_STEPS:
            stages.append([s])
        else:
            stages[-1].append(s)
    return stages


def _prepare_resources(cfg: CurateConfig, work: Path, log) -> tuple[dict[str, str], dict]:
    """Build what map steps share, once, in the driver: classifier artefacts and n-gram indexes."""
    res: dict[str, str] = {}
    info: dict = {}
    for s in cfg.steps:
        if s.type == "edu":
            from phiforge.data.curate.classifier import ensure_default_classifier

            res[s.name] = str(ensure_default_classifier(log=log)) if s.params.classifier == "default" \
                else s.params.classifier
            if not Path(res[s.name]).is_dir():
                raise ConfigError(f"step {s.name!r}: classifier {res[s.name]!r} is not a directory")
        elif s.type == "decontaminate":
            from phiforge.data.curate.decontam import NgramIndex, benchmark_texts

            path = work / f"ngrams-{s.name}.npz"
            if not (path.exists() and Path(str(path) + ".json").exists()):
                missing: list[str] = []
                try:
                    idx = NgramIndex.build(benchmark_texts(s.params.benchmarks, s.params.data_dir, missing),
                                           s.params.ngram)
                except ValueError as e:
                    raise ConfigError(f"step {s.name!r}: {e}") from None
                idx.missing = missing
                idx.save(path)
            idx = NgramIndex.load(path)
            used = sorted({b for b, _ in idx.items})
            info[s.name] = {"benchmarks_used": used, "benchmarks_missing": idx.missing,
                            "items": len(idx.items), "ngrams": int(len(idx.hashes)),
                            "items_too_short": idx.too_short}
            if idx.missing:
                log(f"decontaminate: benchmarks not found, skipped: {', '.join(idx.missing)}")
            res[s.name] = str(path)
    return res, info


def run_curate(cfg: CurateConfig, inputs: str | list[str], out_dir: str | os.PathLike, log=print,
               strict: bool = False) -> dict:
    """Run the pipeline over the input shards; returns the summary also written to OUT/stats.json. Bad input
    records are skipped and listed by file:line (summary["bad_examples"]); `strict` makes the first a
    DataError."""
    from phiforge.progress import progress

    files = expand_inputs(inputs)
    names = shard_names(files)
    out = Path(out_dir)
    work = out / ".work"
    fp = cfg.fingerprint()
    state = work / "config.json"
    if state.exists() and (_read_state(state) or {}).get("fingerprint") != fp:
        log(f"{work}: made by a different config (or damaged); starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, {"fingerprint": fp, "inputs": [str(f) for f in files]})
    executor = make_executor(cfg)
    resources, resource_info = _prepare_resources(cfg, work, log)
    common = {"text_field": cfg.text_field, "id_field": cfg.id_field, "sample_removed": cfg.sample_removed,
              "resources": resources, "strict": strict}

    inputs_now = [str(f) for f in files]
    raw = True
    step_results: list[tuple[Step, list[dict], list[list]]] = []  # per step: shard stats, shard samples
    for k, stage in enumerate(_stages(cfg)):
        sdir = work / f"stage-{k:02d}"
        sdir.mkdir(exist_ok=True)
        outs = [str(sdir / f"{n}.jsonl") for n in names]
        dones = [str(sdir / f"{n}.done.json") for n in names]
        desc = "+".join(s.name for s in stage)
        if stage[0].type in GLOBAL_STEPS:
            step = stage[0]
            sigs = [str(sdir / f"{n}.sig.npy") for n in names]
            sig_dones = [str(sdir / f"{n}.sig.done.json") for n in names]
            tasks = [{**common, "step": step, "input": i, "input_is_raw": raw, "sig": s, "done": d}
                     for i, s, d in zip(inputs_now, sigs, sig_dones) if _read_state(d, "bad") is None]
            if tasks:
                log(f"stage {k} ({desc}): signatures of {len(tasks)} shard(s)")
                with progress(total=len(tasks), desc=f"{desc} signatures", unit="shard") as bar:
                    executor.map(run_signature_shard, tasks, on_done=lambda: bar.update(1))
            arrays, srcs = _read_signatures(sigs, work)
            rep = cluster_global(step, arrays)
            flat_src = [x for lst in srcs for x in lst]
            offset = 0
            removes = []
            for n, lst in zip(names, srcs):
                r = rep[offset:offset + len(lst)]
                own = np.arange(offset, offset + len(lst))
                removes.append({str(i): flat_src[r[i]] for i in np.flatnonzero(r != own).tolist()})
                offset += len(lst)
                atomic_write_json(sdir / f"{n}.remove.json", removes[-1], indent=None)
            tasks = [{**common, "step": step, "input": i, "input_is_raw": raw, "output": o, "done": d,
                      "remove": str(sdir / f"{n}.remove.json"), "sig_done": sd}
                     for i, o, d, n, sd in zip(inputs_now, outs, dones, names, sig_dones)
                     if _read_state(d, "stats", "samples") is None]
            fn = run_filter_shard
        else:
            tasks = [{**common, "steps": stage, "input": i, "input_is_raw": raw, "output": o, "done": d}
                     for i, o, d in zip(inputs_now, outs, dones) if _read_state(d, "stats", "samples") is None]
            fn = run_map_shard
        if tasks:
            log(f"stage {k} ({desc}): {len(tasks)} of {len(names)} shard(s) to do")
            with progress(total=len(tasks), desc=desc, unit="shard") as bar:
                executor.map(fn, tasks, on_done=lambda: bar.update(1))
        else:
            log(f"stage {k} ({desc}): all shards done (resumed)")
        results = [_read_state(d, "stats", "samples") for d in dones]
        for j, step in enumerate(stage):
            step_results.append((step, [r["stats"][j] for r in results], [r["samples"][j] for r in results]))
        inputs_now, raw = outs, False

    summary = _write_reports(cfg, out, step_results, resource_info)
    # the curated shards: the last stage's outputs without the src wrapper
    for n, path in zip(names, inputs_now):
        task = {"input": path, "input_is_raw": False}
        with atomic_open(out / f"{n}.jsonl", "w", encoding="utf-8") as g:
            for rec in _iter_stage_input(task):
                g.write(json.dumps(rec.data, ensure_ascii=False) + "\n")
    return summary


def _read_signatures(sigs: list[str], work: Path) -> tuple[list[np.ndarray], list[list[str]]]:
    """Phase-1 outputs of a global step (signature arrays and their documents' sources), checked."""
    arrays, srcs = [], []
    for s in sigs:
        try:
            arrays.append(np.load(s, allow_pickle=False))
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{s}: damaged intermediate file ({type(e).__name__}); delete {work} and run the same "
                            f"command again") from None
        srcs.append(read_json(s + ".srcs.json", what="curate state", kind=list,
                              fix=f"delete {work} and run the same command again"))
        if len(srcs[-1]) != len(arrays[-1]):
            raise DataError(f"{s}: {len(arrays[-1])} signatures for {len(srcs[-1])} documents (damaged); delete "
                            f"{work} and run the same command again")
    return arrays, srcs


def _merge(shard_stats: list[dict]) -> dict:
    m = {"step": shard_stats[0]["step"], "type": shard_stats[0]["type"], "input": 0, "kept": 0, "removed": {}}
    for s in shard_stats:
        m["input"] += s["input"]
        m["kept"] += s["kept"]
        for r, c in s["removed"].items():
            m["removed"][r] = m["removed"].get(r, 0) + c
        if s.get("bad_records"):
            m["bad_records"] = m.get("bad_records", 0) + s["bad_records"]
            m.setdefault("bad_examples", []).extend(s["bad_examples"])
        if "hits" in s:
            m.setdefault("hits", {}).update(s["hits"])
    m["removed"] = dict(sorted(m["removed"].items()))
    if "bad_examples" in m:
        m["bad_examples"] = m["bad_examples"][:MAX_BAD_LISTED]
    return m


def _write_reports(cfg: CurateConfig, out: Path, step_results, resource_info: dict) -> dict:
    summary: dict = {"steps": []}
    bad_examples: list[str] = []
    for k, (step, shard_stats, shard_samples) in enumerate(step_results):
        merged = _merge(shard_stats)
        bad_examples += merged.get("bad_examples", [])
        merged.update(resource_info.get(step.name, {}))
        atomic_write_json(out / "stats" / f"{k:02d}-{step.name}.json", merged)
        with atomic_open(out / "removed" / f"{k:02d}-{step.name}.jsonl", "w", encoding="utf-8") as f:
            for rec in [x for lst in shard_samples for x in lst][: cfg.sample_removed]:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        summary["steps"].append({k2: v for k2, v in merged.items() if k2 not in ("hits", "bad_examples")})
        if step.type == "decontaminate":
            atomic_write_json(out / "decontamination.json",
                              {"step": step.name, **resource_info.get(step.name, {}),
                               "contaminated_documents": len(merged.get("hits", {})),
                               "hits": merged.get("hits", {})})
    first = summary["steps"][0] if summary["steps"] else {}
    summary["documents_in"] = first.get("input", 0)
    summary["documents_out"] = summary["steps"][-1]["kept"] if summary["steps"] else 0
    summary["bad_records"] = sum(s.get("bad_records", 0) for s in summary["steps"])
    summary["bad_examples"] = bad_examples[:MAX_BAD_LISTED]  # "file:line: reason", as stderr says them
    atomic_write_json(out / "stats.json", summary)
    return summary
