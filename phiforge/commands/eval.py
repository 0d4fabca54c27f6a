"""Run the Phi-2 benchmark suite (or any of its tasks) on a model and print a table; --output writes JSON.

Models: a phiforge checkpoint directory, a Hugging Face model directory, a .gguf file, `smollm2`, a hub id, or
an OpenAI-compatible endpoint (--base-url). Data: --data-dir, $PHIFORGE_BENCHMARKS, ./benchmarks,
../shared/data/benchmarks, then the Hugging Face hub when online. Results are cached in SQLite, so a repeated
or interrupted run resumes for free.

examples:
  phiforge eval --tasks list
  phiforge eval --model smollm2 --tasks arc_easy,piqa --limit 200 --output results.json
  phiforge eval --model out/ckpt --tasks mmlu --num-fewshot 5
  phiforge eval --model my-model --base-url http://127.0.0.1:8000/v1 --tasks gsm8k --limit 50
  phiforge eval --model smollm2 --tasks mmlu,arc_challenge --limit 20 \
      --strategy zero-shot,fewshot,knn-fewshot,knn-shuffle,medprompt   # promptbase strategies side by side

--strategy (multiple-choice tasks only) runs promptbase/Medprompt strategies and prints one table, strategies x
tasks, of accuracy with 95% Wilson intervals: presets zero-shot, fewshot, knn-fewshot, knn-shuffle, medprompt,
medprompt+; modifiers join with '+' (knn-fewshot+shuffle5+weighted, fewshot+cot, medprompt+gate-ask, ...).
See docs/promptbase.md.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint dir, HF dir, .gguf file, alias (smollm2), hub id, or the "
                                        "model name sent to --base-url")
    parser.add_argument("--tasks", default="list", help="comma-separated task names or groups (phi2, "
                                                        "commonsense); 'list' prints the tasks")
    parser.add_argument("--backend", default="auto", choices=["auto", "phiforge", "hf", "openai"],
                        help="model backend (auto: phiforge checkpoint, else transformers; openai with --base-url)")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N items of each task (BBH, MMLU: per "
                                                  "subtask or subject; ToxiGen: statements per class and group)")
    parser.add_argument("--output", help="write the results JSON here")
    parser.add_argument("--log-samples", action="store_true", help="include per-sample logs in the JSON")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward batch")
    parser.add_argument("--dtype", help="model dtype (float32, bfloat16, float16); default as stored / float32")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    parser.add_argument("--data-dir", help="directory of benchmark files (layout of shared/data/benchmarks)")
    parser.add_argument("--cache", help="SQLite result cache (default ~/.cache/phiforge/eval_cache.sqlite or "
                                        "$PHIFORGE_CACHE)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the result cache")
    parser.add_argument("--offline", action="store_true", help="never fetch datasets from the hub")
    parser.add_argument("--samples", type=int, default=1, help="code tasks: samples per problem (n > 1 adds "
                                                               "pass@k at --temperature)")
    parser.add_argument("--temperature", type=float, default=0.8, help="code tasks: sampling temperature for "
                                                                       "--samples > 1")
    parser.add_argument("--max-tokens", type=int, help="generation tasks: max new tokens (default per task)")
    parser.add_argument("--timeout", type=float, default=10.0, help="code tasks: seconds per program")
    g = parser.add_argument_group("promptbase strategies (--strategy)")
    g.add_argument("--strategy", help="comma-separated strategies to compare: zero-shot, fewshot, knn-fewshot, "
                                      "knn-shuffle, medprompt, medprompt+ (+modifiers: shuffleN, weighted, cot, "
                                      "gate, gate-ask, kN)")
    g.add_argument("--shots", type=int, help="exemplars per question for fewshot/kNN strategies (default 5)")
    g.add_argument("--shuffles", type=int, help="choice-shuffle ensemble size for shuffling strategies (default 5)")
    g.add_argument("--vote", choices=["majority", "weighted"], help="how shuffled answers combine (default "
                                                                     "majority; weighted = summed probabilities)")
    g.add_argument("--gate-threshold", type=float, help="medprompt+ confidence gate: answer directly when the "
                                                        "ensemble probability is at least this (default 0.5)")
    g.add_argument("--embedder", default="minilm", help="kNN embedder: minilm (all-MiniLM-L6-v2, local), hashing "
                                                        "(bag of words), or a sentence-transformers directory")
    g.add_argument("--pool-size", type=int, default=100, help="tasks without a train split: the first N items of "
                                                              "the file are the few-shot pool (never evaluated)")
    g.add_argument("--subjects", help="MMLU: comma-separated subjects to evaluate (default all 57)")
    g.add_argument("--cot-max-tokens", type=int, default=128, help="chain of thought: max new tokens")
    g.add_argument("--cot-candidates", type=int, help="CoT exemplars: nearest candidates searched for k correct "
                                                      "self-generated rationales (default 3k)")
    g.add_argument("--seed", type=int, default=0, help="random few-shot and shuffle seed")


def print_task_list() -> None:
    from phiforge.eval.tasks import GROUPS, all_tasks

    tasks = all_tasks()
    width = max(len(n) for n in tasks)
    print(f"{'task'.ljust(width)}  version  kind                   shots  metrics / prompt format")
    for t in tasks.values():
        fmt = t.prompt_format.replace("\n", "\\n")
        print(f"{t.name.ljust(width)}  {t.version.ljust(7)}  {t.kind.ljust(21)}  {str(t.num_fewshot).rjust(5)}  "
              f"{','.join(t.metrics)}  |  {fmt}")
    print("\ngroups: " + "; ".join(f"{g} = {','.join(v)}" for g, v in GROUPS.items()))


def main(args: argparse.Namespace) -> int:
    from phiforge.errors import PhiforgeError

    if args.tasks == "list":
        print_task_list()
        return 0
    if not args.model:
        raise PhiforgeError("--model is required (or --tasks list)")
    from phiforge.eval.evaluator import evaluate, format_table
    from phiforge.eval.lm import load_lm
    from phiforge.eval.tasks import task_names

    names = task_names(args.tasks)
    if args.strategy:
        return run_strategies(args, names)
    lm = load_lm(args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                 batch_size=args.batch_size, base_url=args.base_url)
    opts = {"samples": args.samples, "temperature": args.temperature, "timeout": args.timeout}
    if args.max_tokens:
        opts["max_tokens"] = args.max_tokens
    results = evaluate(lm, names, num_fewshot=args.num_fewshot, limit=args.limit, data_dir=args.data_dir,
                       cache_path=args.cache, use_cache=not args.no_cache, log_samples=args.log_samples,
                       allow_hub=not args.offline, model_spec=args.model, task_options=opts)
    print(format_table(results))
    return _finish(args, results)


def run_strategies(args: argparse.Namespace, names: list[str]) -> int:
    from phiforge.eval.lm import load_lm
    from phiforge.eval.strategies import evaluate_strategies, format_strategy_table, parse_strategy
    from phiforge.eval.strategies.embed import get_embedder

    strategies = [parse_strategy(x.strip(), k=args.shots, shuffles=args.shuffles, vote=args.vote,
                                 threshold=args.gate_threshold) for x in args.strategy.split(",") if x.strip()]
    from phiforge.eval.strategies.items import to_item
    from phiforge.eval.tasks import get_task

    for n in names:  # fail before loading a model: strategies need multiple-choice items
        if get_task(n).kind != "multiple_choice":
            to_item(n, {}, 0)
    embedder = get_embedder(args.embedder) if any(s.shots == "knn" for s in strategies) else None
    subjects = [x.strip() for x in args.subjects.split(",") if x.strip()] if args.subjects else None
    lm = load_lm(args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                 batch_size=args.batch_size, base_url=args.base_url)
    results = evaluate_strategies(lm, names, strategies, embedder=embedder, data_dir=args.data_dir, limit=args.limit,
                                  subjects=subjects, pool_size=args.pool_size, cache_path=args.cache,
                                  use_cache=not args.no_cache, cot_max_tokens=args.cot_max_tokens,
                                  cot_candidates=args.cot_candidates, seed=args.seed, allow_hub=not args.offline,
                                  log_samples=args.log_samples, model_spec=args.model)
    print(format_strategy_table(results))
    return _finish(args, results)


def _finish(args: argparse.Namespace, results: dict) -> int:
    """Report cache use and write --output (JSON) atomically."""
    from phiforge.atomic import atomic_write_json

    c = results["cache"]
    print(f"cache: {c['hits']} hits, {c['misses']} computed", file=sys.stderr)
    if args.output:
        atomic_write_json(args.output, json.loads(json.dumps(results, default=str)))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
