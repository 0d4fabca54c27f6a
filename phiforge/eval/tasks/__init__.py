"""The task registry: name -> Task. `get_task(name)`, `all_tasks()`; `phiforge eval --tasks list` prints them."""

from __future__ import annotations

from phiforge.errors import PhiforgeError
from phiforge.eval.tasks.base import Task, TaskResult

__all__ = ["Task", "TaskResult", "all_tasks", "get_task", "task_names"]

# Task groups accepted by --tasks besides single names.
GROUPS = {
    "phi2": ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "siqa", "mmlu",
             "bbh", "gsm8k", "humaneval", "mbpp"],
    "commonsense": ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "siqa"],
}


def all_tasks() -> dict[str, Task]:
    from phiforge.eval.tasks.code import code_tasks
    from phiforge.eval.tasks.generation import generation_tasks
    from phiforge.eval.tasks.multiple_choice import multiple_choice_tasks
    from phiforge.eval.tasks.toxigen import toxigen_tasks

    tasks = multiple_choice_tasks() + generation_tasks() + code_tasks() + toxigen_tasks()
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
