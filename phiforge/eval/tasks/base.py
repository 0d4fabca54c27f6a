"""What every task is: data (where to find it, how to read it) + a prompt format + how to score.

A task is a small object whose fields are data: name, version, prompt template, choices, target, few-shot
pool and count, stop strings, answer extraction, metrics. It answers for itself everywhere a benchmark matters:

    hub_splits(subjects)      the hub splits it reads (lm-eval's dataset ids, configs, splits): `data pull`
    fetch(data_dir, ...)      its documents, few-shot pool and sources (checked before any model loads)
    load()                    its documents and where they came from (fetch, in short)
    select(docs, limit)       what `--limit N` keeps (per subtask for BBH and MMLU)
    run(lm, docs)             builds the requests, sends them in one batched call per request type, scores them
    mc_item(doc, i)           its multiple-choice view for the promptbase strategies (multiple-choice tasks)
    mc_pool(data_dir)         its own exemplar split for those strategies (MMLU's dev set), else None
    decontamination_texts()   the texts of its items that curation keeps out of training data
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from phiforge.errors import DataError, PhiforgeError
from phiforge.eval.data import HubSplit, MissingData, Source, benchmark_items, record_text
from phiforge.lm.base import LM


@dataclass
class TaskResult:
    """Per-task metrics {name: (value, stderr)}, the number of items, notes and optional per-sample logs."""

    metrics: dict[str, tuple[float, float]]
    n: int
    notes: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskData:
    """What a task evaluates: its documents, its few-shot pool (None: none needed or the task's own), where each
    split came from, and notes (e.g. subjects without data)."""

    docs: list[dict]
    sources: list[Source]
    pool: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return self.sources[0].where if self.sources else ""


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice question in promptbase's letter format: question text, option texts, gold index."""

    uid: str  # "<task>:<index in the task's file>" (MMLU dev: "mmlu-dev:<subject>:<i>")
    question: str
    options: tuple[str, ...]
    gold: int
    subject: str = ""


@dataclass
class Task:
    name: str
    version: str
    kind: str  # multiple_choice | generate_until | code | likelihood_preference
    prompt_format: str  # the template, as shown by `phiforge eval --tasks list`
    metrics: tuple[str, ...]
    num_fewshot: int = 0
    fewshot_pool: str = "none"
    local_path: str = ""  # relative to a benchmarks directory
    hub: str | None = None  # dataset id lm-eval uses
    notes: str = ""
    # Decontamination reads the release files themselves (every string of a record: prompt, choices, answer).
    decontam_files: str = ""  # glob under a benchmark directory; "" = local_path
    decontam_id: str | None = None  # the record field that names an item (else its position in the file)

    def hub_splits(self, subjects: list[str] | None = None) -> list[HubSplit]:
        """The hub splits this task reads (evaluation and few-shot), as lm-eval's builtin task names them."""
        raise NotImplementedError

    def subjects(self) -> list[str] | None:
        """The subtasks `--subjects` selects from (MMLU's subjects, BBH's tasks); None for a single task."""
        return None

    def fetch(self, data_dir: str | os.PathLike | None = None, allow_hub: bool = True,
              subjects: list[str] | None = None) -> TaskData:
        """The documents to evaluate, the few-shot pool and their sources; a DataError (one line: what is
        missing, why, and the command that fixes it) when there are none."""
        raise NotImplementedError

    def load(self, data_dir: str | os.PathLike | None = None, allow_hub: bool = True) -> tuple[list[dict], str]:
        """(documents, where they came from) — `fetch` without the pool and the details."""
        data = self.fetch(data_dir, allow_hub)
        return data.docs, data.where

    def select(self, docs: list[dict], limit: int | None) -> list[dict]:
        """The documents `--limit` keeps: the first `limit` (a fixed, reproducible sample)."""
        return limit_docs(docs, limit)

    def run(self, lm: LM, docs: list[dict], *, num_fewshot: int | None = None, log_samples: bool = False,
            data_dir: str | os.PathLike | None = None, **opts: Any) -> TaskResult:
        raise NotImplementedError

    def mc_item(self, doc: dict, index: int) -> MCItem:
        """Document `index` as a multiple-choice question (only multiple-choice tasks have this view)."""
        raise PhiforgeError(f"task {self.name!r} is not multiple-choice: it has no question/options view")

    def mc_pool(self, data_dir: str | os.PathLike | None = None) -> list[MCItem] | None:
        """Exemplars from a split of their own (disjoint from the evaluated items), or None when the task has
        none and the strategies hold out the first items of the evaluation file instead."""
        return None

    def decontamination_texts(self, data_dir: str | os.PathLike | None = None
                              ) -> Iterator[tuple[str, str]] | None:
        """(item id, text) for every item of the benchmark's local files (its release files, else a pulled or
        cloned hub copy), for decontamination to n-gram against; None when no local copy is found."""
        pattern = self.decontam_files or self.local_path
        items = benchmark_items(pattern, self.decontam_id, data_dir) if pattern else None
        if items is not None:
            return items
        try:
            data = self.fetch(data_dir, allow_hub=False)
        except DataError:
            return None
        return ((f"{self.name}/{i}", record_text(d)) for i, d in enumerate(data.docs))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "kind": self.kind, "num_fewshot": self.num_fewshot,
                "fewshot_pool": self.fewshot_pool, "prompt_format": self.prompt_format,
                "metrics": list(self.metrics), "local_path": self.local_path, "hub": self.hub, "notes": self.notes}

    def lm_eval_config(self, num_fewshot: int) -> dict[str, Any]:
        """The task's entry in results' `configs`, with lm-eval's field names where they apply."""
        splits = self.hub_splits()
        first = splits[0] if splits else None
        out_type = {"multiple_choice": "multiple_choice", "likelihood_preference": "loglikelihood_rolling"}
        return {"task": self.name, "dataset_path": first.path if first else None,
                "dataset_name": first.name if first else None, "test_split": first.split if first else None,
                "output_type": out_type.get(self.kind, "generate_until"), "num_fewshot": num_fewshot,
                "fewshot_config": {"pool": self.fewshot_pool}, "doc_to_text": self.prompt_format,
                "metric_list": [{"metric": m, "higher_is_better": True} for m in self.metrics],
                "metadata": {"version": self.version}, "notes": self.notes}


def limit_docs(docs: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` documents (a fixed, reproducible sample)."""
    return docs if limit is None else docs[: max(0, limit)]


def limit_per_subtask(docs: list[dict], limit: int | None, key: str) -> list[dict]:
    """At most `limit` documents of each subtask (`doc[key]`), so --limit N samples every one of them."""
    if limit is None:
        return docs
    seen: dict[str, int] = {}
    out = []
    for d in docs:
        if seen.get(d[key], 0) < limit:
            seen[d[key]] = seen.get(d[key], 0) + 1
            out.append(d)
    return out


def subtask_data(task: Task, parts: list[str], load_part, subjects: list[str] | None) -> TaskData:
    """Documents of the parts (subjects, BBH tasks) that have data. Parts asked for by name must all be found;
    of the default set (all parts), those without data are left out with a note, unless none has any."""
    docs: list[dict] = []
    sources = []
    pools: dict[str, Any] = {}
    missing: list[MissingData] = []
    for part in parts:
        try:
            part_docs, part_sources, pool = load_part(part)
        except MissingData as e:
            missing.append(e)
            continue
        docs += part_docs
        sources += part_sources
        if pool is not None:
            pools[part] = pool
    if missing and (subjects or not docs):
        raise MissingData.merged(missing)
    notes = []
    if missing:
        notes.append(f"{task.name}: {len(parts) - len(missing)} of {len(parts)} subtasks have data ({missing[0].cause} "
                     f"for the others, e.g. {missing[0].looked_for[0]}); the averages cover those only")
    return TaskData(docs, sources, pools, notes)


def check_subjects(task: Task, subjects: list[str] | None) -> list[str]:
    """The subtasks to evaluate: `subjects` (each one checked) or all of them."""
    known = task.subjects() or []
    if not subjects:
        return list(known)
    bad = [s for s in subjects if s not in known]
    if bad:
        raise PhiforgeError(f"--subjects: {task.name} has no subtask {bad[0]!r} (known: {', '.join(known)})")
    return list(dict.fromkeys(subjects))
