"""The task registry: name -> Task. `get_task(name)`, `all_tasks()`; `phiforge eval --tasks list` prints them.

Everything that needs to know about a benchmark asks here: the evaluator, the promptbase strategies
(`mc_task`) and curation's decontamination (`benchmark_names`, `decontamination_texts`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from phiforge.errors import PhiforgeError
from phiforge.eval.data import benchmark_items
from phiforge.eval.tasks.base import MCItem, Task, TaskResult

__all__ = ["MCItem", "Task", "TaskResult", "all_tasks", "benchmark_names", "decontamination_texts", "get_task",
           "mc_task", "task_names"]

# Benchmarks phiforge does not score but still keeps out of training data: name -> (files, id field), read as
# `Task.decontamination_texts` reads a task's files.
UNSCORED_BENCHMARKS = {"truthfulqa": ("truthfulqa/TruthfulQA.csv", None)}

# Task groups accepted by --tasks besides single names.
GROUPS = {
    "phi2": ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "siqa", "mmlu",
             "bbh", "gsm8k", "humaneval", "mbpp", "squadv2"],
    "commonsense": ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "siqa"],
}


def all_tasks() -> dict[str, Task]:
    from phiforge.eval.tasks.code import code_tasks
    from phiforge.eval.tasks.generation import generation_tasks
    from phiforge.eval.tasks.multiple_choice import multiple_choice_tasks
    from phiforge.eval.tasks.squad import squad_tasks
    from phiforge.eval.tasks.toxigen import toxigen_tasks

    tasks = multiple_choice_tasks() + generation_tasks() + code_tasks() + toxigen_tasks() + squad_tasks()
    return {t.name: t for t in tasks}


def task_names(spec: str) -> list[str]:
    """Expand a comma-separated --tasks value (names and groups) into task names, in order, without repeats."""
    known = all_tasks()
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        names = GROUPS.get(part, [part])
        for n in names:
            if n not in known:
                raise PhiforgeError(f"--tasks: unknown task {n!r} (see `phiforge eval --tasks list`)")
            if n not in out:
                out.append(n)
    return out


def get_task(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        raise PhiforgeError(f"unknown task {name!r} (see `phiforge eval --tasks list`)")
    return tasks[name]


def mc_task(name: str) -> Task:
    """Task `name` when it is multiple-choice (what the promptbase strategies work on), else a PhiforgeError."""
    task = get_task(name)
    if task.kind != "multiple_choice":
        mc = ", ".join(n for n, t in all_tasks().items() if t.kind == "multiple_choice")
        raise PhiforgeError(f"--strategy works on multiple-choice tasks ({mc}); {name!r} is not one")
    return task


def benchmark_names() -> list[str]:
    """Every benchmark decontamination can read: the tasks, then the unscored benchmarks."""
    return [*all_tasks(), *UNSCORED_BENCHMARKS]


def decontamination_texts(name: str, data_dir: str | os.PathLike | None = None
                          ) -> Iterator[tuple[str, str]] | None:
    """(item id, text) of every item of benchmark `name`, or None when its files are not found (see
    `Task.decontamination_texts`); a ValueError for a name that is no benchmark."""
    if name in UNSCORED_BENCHMARKS:
        return benchmark_items(*UNSCORED_BENCHMARKS[name], data_dir)
    tasks = all_tasks()
    if name not in tasks:
        raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(benchmark_names())})")
    return tasks[name].decontamination_texts(data_dir)
