"""Generate synthetic textbooks and exercises into JSONL shards (resumable: rerun the same command to go on).

Sources (the config's `mix`): procedural Python exercises and math problems (no model, correct by
construction) and teacher-written textbooks over topic x audience x format prompts. Code is run in the
sandbox and kept only if its asserts pass; exact and near duplicates are dropped; OUT/stats.json has tokens,
duplicate rate, pass rate and cost.

examples:
  phiforge synth --config configs/synth.yaml --out runs/synth
  phiforge synth --config configs/synth_textbooks.yaml --n 64 --out runs/textbooks
  phiforge synth --config configs/synth_textbooks.yaml --teacher openai:llama3@http://127.0.0.1:8080/v1 --out runs/t
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="synth config YAML (e.g. configs/synth.yaml)")
    parser.add_argument("--out", required=True, help="output directory (shards, rejects, stats, cache)")
    parser.add_argument("--n", type=int, default=None, help="samples to keep (overrides the config's n)")
    parser.add_argument("--teacher", default=None,
                        help="teacher for textbook prompts: smollm2 | HF dir | .gguf | openai:MODEL@URL | "
                             "phiforge:CKPT_DIR (overrides the config's teacher)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the prompt sequence (overrides config)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per teacher call (overrides config)")
    parser.add_argument("--require-isolation", action="store_true", help="refuse to run generated code where "
                        "the sandbox cannot isolate it (no root, no user namespaces)")
    parser.add_argument("--budget", type=float, default=None,
                        help="cost cap for an OpenAI-compatible teacher, for the whole run: every rerun into "
                             "OUT counts against it (OUT/spend.jsonl); stops cleanly before exceeding it")


def main(args: argparse.Namespace) -> int:
    from phiforge.data.synth.pipeline import SynthConfig, run_synth
    from phiforge.errors import ConfigError
    from phiforge.lm.spec import backend_for

    cfg = SynthConfig.load(args.config)
    if args.seed is not None:
        cfg.seed = args.seed
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    if args.teacher is not None:
        if float(cfg.mix.get("textbooks", 0)) <= 0:
            raise ConfigError(f"{args.config}: --teacher given but the config's mix has no textbooks "
                              "(use e.g. configs/synth_textbooks.yaml)")
        cfg.teacher = args.teacher
        if backend_for(args.teacher) != "openai":  # options of one teacher kind do not fit another
            cfg.teacher_options = {k: v for k, v in cfg.teacher_options.items() if k in ("batch_size", "device")}
        else:
            cfg.teacher_options = {k: v for k, v in cfg.teacher_options.items() if k not in ("batch_size", "device")}
    if args.budget is not None:
        cfg.teacher_options["budget"] = args.budget
    cfg.validate(args.config)
    if args.require_isolation:
        from phiforge.sandbox import require_isolation

        require_isolation()
    stats = run_synth(cfg, args.out, n=args.n)
    print(json.dumps({k: stats[k] for k in ("kept", "rejected", "duplicates", "code", "tokens", "cost", "stopped")}))
    return 0
