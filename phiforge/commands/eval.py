"""Run the Phi-2 benchmark suite (or any of its tasks) on a model and print a table; --out writes JSON.

Models: a phiforge checkpoint directory, a Hugging Face model directory, a .gguf file, `smollm2`, a hub id, or
an OpenAI-compatible endpoint (openai:MODEL@URL, or --base-url). Data: the Hugging Face hub datasets
lm-evaluation-harness uses, or a local copy (--data-dir, $PHIFORGE_BENCHMARKS, ./benchmarks), e.g. one made by
`phiforge data pull TASKS --out DIR` on a machine with internet; every task's data is found before the model
loads. Results are cached in SQLite, so a repeated or interrupted run resumes for free; the results JSON is in
lm-eval's layout and says what ran (docs/eval.md).

examples:
  phiforge eval --tasks list
  phiforge data pull arc_easy,piqa --out bench-data      # online, once; then anywhere:
  phiforge eval --model smollm2 --tasks arc_easy,piqa --data-dir bench-data
  phiforge eval --model smollm2 --tasks mmlu --subjects anatomy,virology
  phiforge eval --model smollm2 --tasks arc_easy,piqa --limit 200 --out results.json
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

from phiforge.commands.flags import add_dtype, add_hidden_alias, add_max_new_tokens, add_quant, check_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint dir, HF dir, .gguf file, alias (smollm2), hub id, "
                                        "phiforge:DIR, hf:..., openai:MODEL@URL, or the model name sent to "
                                        "--base-url")
    parser.add_argument("--tasks", help="comma-separated task names or groups (phi2, commonsense); 'list' prints "
                                        "the tasks")
    parser.add_argument("--subjects", help="mmlu/bbh: comma-separated subjects or BBH tasks to evaluate (default "
                                           "all of them; plain eval and --strategy alike)")
    parser.add_argument("--backend", default="auto", choices=["auto", "phiforge", "hf", "openai"],
                        help="model backend (auto: phiforge checkpoint, else transformers; openai with --base-url)")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N items of each task (BBH, MMLU: per "
                                                  "subtask or subject; ToxiGen: statements per class and group)")
    parser.add_argument("--out", help="write the results JSON here")
    add_hidden_alias(parser, "--output", "out")
    parser.add_argument("--log-samples", action="store_true", help="include per-sample logs in the JSON")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward batch")
    add_dtype(parser, "model dtype (default: as stored, or fp32 for transformers models)")
    add_quant(parser)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    parser.add_argument("--data-dir", help="local benchmark data: what `phiforge data pull --out DIR` wrote, hub "
                                           "repository clones, or release files (docs/eval.md)")
    parser.add_argument("--cache", help="SQLite result cache (default ~/.cache/phiforge/eval_cache.sqlite or "
                                        "$PHIFORGE_CACHE)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the result cache")
    parser.add_argument("--offline", action="store_true", help="never reach the hub: datasets and models (a hub id "
                                                               "only from the local Hugging Face cache)")
    parser.add_argument("--samples", type=int, default=1, help="code tasks: samples per problem (n > 1 adds "
                                                               "pass@k at --temperature)")
    parser.add_argument("--temperature", type=float, default=0.8, help="code tasks: sampling temperature for "
                                                                       "--samples > 1")
    add_max_new_tokens(parser, None, "generation tasks: max new tokens (default per task)")
    parser.add_argument("--timeout", type=float, default=10.0, help="code tasks: seconds per program")
    parser.add_argument("--no-strict-values", action="store_true", help="code tasks: let functions return any "
                        "value (default: only plain built-in data passes; see phiforge/sandbox)")
    parser.add_argument("--require-isolation", action="store_true", help="code tasks: refuse to run programs "
                        "where the sandbox cannot isolate them (no root, no user namespaces)")
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
    add_max_new_tokens(g, 128, "chain of thought: max new tokens", prefix="cot-", old="--cot-max-tokens")
    g.add_argument("--cot-candidates", type=int, help="CoT exemplars: nearest candidates searched for k correct "
                                                      "self-generated rationales (default 3k)")
    g.add_argument("--seed", type=int, default=0, help="random few-shot and shuffle seed")


def quant_options(args: argparse.Namespace) -> dict:
    """load_lm's quantization options from --quant / --group-size (none: nothing, so any backend loads). Called
    before any data or model is read: a --device or --quant this model cannot take is one line at once."""
    from phiforge.lm.spec import check_quant

    if args.backend != "openai" and not args.base_url:
        check_device(args.device)
    if check_quant(args.model, args.quant, backend=args.backend, base_url=args.base_url) is None:
        return {}
    return {"quant": args.quant, "group_size": args.group_size}


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
    if not args.tasks:
        raise PhiforgeError("--tasks is required: e.g. --tasks arc_easy,piqa or --tasks phi2 (`phiforge eval "
                            "--tasks list` lists them)")
    if not args.model:
        raise PhiforgeError("--model is required (e.g. --model smollm2, a checkpoint directory or a hub id)")
    from phiforge.eval.evaluator import evaluate, format_table, prepare
    from phiforge.eval.tasks import task_names
    from phiforge.lm.spec import load_lm

    names = task_names(args.tasks)
    subjects = [x.strip() for x in args.subjects.split(",") if x.strip()] if args.subjects else None
    if args.require_isolation:
        from phiforge.sandbox import require_isolation

        require_isolation()
    quant_options(args)  # a --device or --quant the model cannot take: one line before anything is read
    if args.strategy:
        return run_strategies(args, names)
    # Data first: a missing benchmark is one line before minutes of model loading, not after.
    data = prepare(names, data_dir=args.data_dir, allow_hub=not args.offline, subjects=subjects)
    lm = load_lm(args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                 batch_size=args.batch_size, base_url=args.base_url, offline=args.offline or None,
                 **quant_options(args))
    opts = {"samples": args.samples, "temperature": args.temperature, "timeout": args.timeout,
            "strict_values": not args.no_strict_values}
    if args.max_new_tokens:
        opts["max_tokens"] = args.max_new_tokens
    results = evaluate(lm, names, num_fewshot=args.num_fewshot, limit=args.limit, data_dir=args.data_dir,
                       cache_path=args.cache, use_cache=not args.no_cache, log_samples=args.log_samples,
                       allow_hub=not args.offline, model_spec=args.model, task_options=opts, data=data,
                       subjects=subjects)
    print(format_table(results))
    return _finish(args, results)


def run_strategies(args: argparse.Namespace, names: list[str]) -> int:
    from phiforge.eval.strategies import evaluate_strategies, format_strategy_table, parse_strategy
    from phiforge.eval.strategies.embed import get_embedder

    strategies = [parse_strategy(x.strip(), k=args.shots, shuffles=args.shuffles, vote=args.vote,
                                 threshold=args.gate_threshold) for x in args.strategy.split(",") if x.strip()]
    from phiforge.eval.evaluator import prepare
    from phiforge.eval.tasks import mc_task
    from phiforge.lm.spec import load_lm

    for n in names:  # fail before loading a model: strategies need multiple-choice items, and their data
        mc_task(n)
    subjects = [x.strip() for x in args.subjects.split(",") if x.strip()] if args.subjects else None
    prepare(names, data_dir=args.data_dir, allow_hub=not args.offline, subjects=subjects)
    embedder = get_embedder(args.embedder) if any(s.shots == "knn" for s in strategies) else None
    lm = load_lm(args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                 batch_size=args.batch_size, base_url=args.base_url, offline=args.offline or None,
                 **quant_options(args))
    results = evaluate_strategies(lm, names, strategies, embedder=embedder, data_dir=args.data_dir, limit=args.limit,
                                  subjects=subjects, pool_size=args.pool_size, cache_path=args.cache,
                                  use_cache=not args.no_cache, cot_max_tokens=args.cot_max_new_tokens,
                                  cot_candidates=args.cot_candidates, seed=args.seed, allow_hub=not args.offline,
                                  log_samples=args.log_samples, model_spec=args.model)
    print(format_strategy_table(results))
    return _finish(args, results)


def _finish(args: argparse.Namespace, results: dict) -> int:
    """Report cache use and write --out (JSON) atomically."""
    from phiforge.atomic import atomic_write_json

    c = results["cache"]
    print(f"cache: {c['hits']} hits, {c['misses']} computed", file=sys.stderr)
    if args.out:
        atomic_write_json(args.out, json.loads(json.dumps(results, default=str)))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
