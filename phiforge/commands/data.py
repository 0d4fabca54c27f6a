"""Benchmark data for machines without internet: `phiforge data pull` fetches every suite task's hub data (the
dataset ids, configs and splits lm-evaluation-harness loads) into a folder with a manifest of hashes; `phiforge
eval --data-dir DIR` then reads that folder and nothing else.

examples:
  phiforge data pull --out bench-data                      # every suite task (phi2 group, toxigen)
  phiforge data pull arc_easy,piqa,mmlu --out bench-data   # some tasks; pulling more later adds to the folder
  phiforge data pull mmlu --subjects anatomy,virology --out bench-data
  phiforge eval --model smollm2 --tasks arc_easy --data-dir bench-data   # on the cluster node, offline

Layout: DIR/<dataset id>/<config>/<split>.jsonl (one hub row per line; config "default" when the dataset has
none), DIR/<dataset id>/README.md (so `datasets.load_dataset(DIR/<dataset id>, config)` reads it too) and
DIR/manifest.json (rows and sha256 of every file; eval refuses a file whose hash no longer matches). Splits
already pulled with a matching hash are skipped, so an interrupted pull resumes.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    pull = sub.add_parser("pull", help="fetch the tasks' hub data into --out (needs internet)",
                          description="Fetch the tasks' hub data into --out, with manifest.json (rows, sha256).")
    pull.add_argument("tasks", nargs="?", default=None, metavar="TASKS",
                      help="comma-separated tasks or groups (default: every suite task: phi2, toxigen)")
    pull.add_argument("--out", required=True, help="the data directory to write (then: phiforge eval --data-dir)")
    pull.add_argument("--subjects", help="mmlu/bbh: only these subjects or BBH tasks (default all)")
    pull.add_argument("--force", action="store_true", help="fetch again even what is already there")


def default_tasks() -> list[str]:
    """Every suite task: the Phi-2 group and ToxiGen."""
    from phiforge.eval.tasks import GROUPS

    return [*GROUPS["phi2"], "toxigen"]


def main(args: argparse.Namespace) -> int:
    from phiforge.eval.data import pull_splits
    from phiforge.eval.evaluator import split_subjects
    from phiforge.eval.tasks import get_task, task_names

    names = task_names(args.tasks) if args.tasks else default_tasks()
    subjects = [x.strip() for x in args.subjects.split(",") if x.strip()] if args.subjects else None
    per = split_subjects(names, subjects)
    splits = {n: get_task(n).hub_splits(per[n]) for n in names}
    manifest = pull_splits(splits, args.out, force=args.force)
    # Read back what eval will read (offline, this folder first), so a broken copy fails here, not on the node.
    for n in names:
        get_task(n).fetch(args.out, allow_hub=False, subjects=per[n])
    files = [manifest["files"][s.rel] for ss in splits.values() for s in ss]
    print(f"{len(files)} splits of {len(names)} task(s) ({sum(f['rows'] for f in files):,} rows) in {args.out}; "
          f"use: phiforge eval --data-dir {args.out} --tasks {','.join(names)} --model ...")
    return 0
