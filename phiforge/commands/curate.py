"""Filter, deduplicate and decontaminate a corpus of JSONL/Parquet shards with a YAML list of steps.

Steps: text (Gopher quality/repetition), python (ast parse, comment ratio, generated files, data blobs),
edu (educational-value classifier + threshold), exact_dedup, minhash (MinHash-LSH near-duplicates),
decontaminate (13-gram overlap with benchmark prompts/answers). Each step writes OUT/stats/<k>-<step>.json and
a sample of what it removed to OUT/removed/<k>-<step>.jsonl. Runs locally (processes) or on Ray; resumable
per shard: rerun the same command to continue. See configs/curate*.yaml.

Bad input records (not UTF-8, invalid JSON, not an object, no text field) are skipped, each alone, and named
as file:line on stderr and in OUT/stats.json; --strict makes the first one an error.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe: a 'steps' list and options")
    parser.add_argument("--in", dest="inputs", required=True, nargs="+",
                        help="input glob(s) or directories of .jsonl / .jsonl.gz / .parquet shards")
    parser.add_argument("--out", required=True, help="output directory (curated shards, stats, removed samples)")
    parser.add_argument("--executor", choices=["local", "ray"], default=None,
                        help="override the config's executor (local processes or Ray tasks)")
    parser.add_argument("--workers", type=int, default=None, help="local executor: number of processes")
    parser.add_argument("--text-field", default=None, help="override the record field holding the text")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")


def main(args: argparse.Namespace) -> int:
    import dataclasses

    from phiforge.data.curate.pipeline import load_config, run_curate

    cfg = load_config(args.config)
    over = {k: v for k, v in (("executor", args.executor), ("workers", args.workers),
                              ("text_field", args.text_field)) if v is not None}
    cfg = dataclasses.replace(cfg, **over)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, flush=True))
    summary = run_curate(cfg, args.inputs, args.out, log=log, strict=args.strict)
    for line in summary["bad_examples"]:
        print(f"phiforge: skipped {line}", file=sys.stderr)
    if summary["bad_records"] > len(summary["bad_examples"]):
        print(f"phiforge: ... and {summary['bad_records'] - len(summary['bad_examples'])} more bad records",
              file=sys.stderr)
    for s in summary["steps"]:
        removed = ", ".join(f"{r}={c}" for r, c in s["removed"].items()) or "none"
        print(f"{s['step']:>16}: {s['input']} in, {s['kept']} kept; removed: {removed}")
    print(json.dumps({k: summary[k] for k in ("documents_in", "documents_out", "bad_records")}))
    return 0
