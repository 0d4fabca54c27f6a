"""Filter, deduplicate and decontaminate a corpus of JSONL/Parquet shards with a YAML list of steps.

Steps: text (Gopher quality/repetition), python (ast parse, comment ratio, generated files, data blobs),
edu (educational-value classifier + threshold), exact_dedup, minhash (MinHash-LSH near-duplicates),
decontaminate (13-gram overlap with benchmark prompts/answers). Each step writes OUT/stats/<k>-<step>.json and
a sample of what it removed to OUT/removed/<k>-<step>.jsonl. Runs locally (processes) or on Ray; resumable
per shard: rerun the same command to continue. See configs/curate*.yaml.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe: a 'steps' list and options")
    parser.add_argument("--in", dest="inputs", required=True, nargs="+",
                        help="input glob(s) or directories of .jsonl / .jsonl.gz / .parquet shards")
    parser.add_argument("--out", required=True, help="output directory (curated shards, stats, removed samples)")
    parser.add_argument("--executor", choices=["local", "ray"], default=None,
                        help="override the config's executor (local processes or Ray tasks)")
    parser.add_argument("--workers", type=int, default=None, help="local executor: number of processes")
    parser.add_argument("--text-field", default=None, help="override the record field holding the text")


def main(args: argparse.Namespace) -> int:
    import dataclasses

    from phiforge.data.curate.pipeline import load_config, run_curate

    cfg = load_config(args.config)
    over = {k: v for k, v in (("executor", args.executor), ("workers", args.workers),
                              ("text_field", args.text_field)) if v is not None}
    cfg = dataclasses.replace(cfg, **over)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, flush=True))
    summary = run_curate(cfg, args.inputs, args.out, log=log)
    for s in summary["steps"]:
        removed = ", ".join(f"{r}={c}" for r, c in s["removed"].items()) or "none"
        print(f"{s['step']:>16}: {s['input']} in, {s['kept']} kept; removed: {removed}")
    print(json.dumps({k: summary[k] for k in ("documents_in", "documents_out", "bad_records")}))
    return 0
