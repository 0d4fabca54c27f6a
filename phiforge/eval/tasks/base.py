"""What every task is: data (where to find it, how to read it) + a prompt format + how to score.

A task is a small object whose fields are data: name, version, prompt template, choices, target, few-shot
pool and count, stop strings, answer extraction, metrics. `load()` gives its documents; `run()` builds the
requests, sends them to the model in one batched call per request type, and scores them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from phiforge.eval.lm import LM


@dataclass
class TaskResult:
    """Per-task metrics {name: (value, stderr)}, the number of items, notes and optional per-sample logs."""

    metrics: dict[str, tuple[float, float]]
    n: int
    notes: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


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

    def load(self, data_dir: str | os.PathLike | None = None, allow_hub: bool = True) -> tuple[list[dict], str]:
        """(documents, source) — raises DataError listing the places looked at when missing."""
        raise NotImplementedError

    def run(self, lm: LM, docs: list[dict], *, num_fewshot: int | None = None, log_samples: bool = False,
            data_dir: str | os.PathLike | None = None, **opts: Any) -> TaskResult:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "kind": self.kind, "num_fewshot": self.num_fewshot,
                "fewshot_pool": self.fewshot_pool, "prompt_format": self.prompt_format,
                "metrics": list(self.metrics), "local_path": self.local_path, "hub": self.hub, "notes": self.notes}


def limit_docs(docs: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` documents (a fixed, reproducible sample)."""
    return docs if limit is None else docs[: max(0, limit)]
