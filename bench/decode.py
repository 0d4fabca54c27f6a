"""Batch-1 greedy decode speed: phiforge `generate_ids` vs transformers `generate` on the same weights (CPU).

Model: the `phi-100m` preset (full 51,200 vocab) with random weights, scaled so logits are well spread (greedy
argmax is not a coin-flip between near-ties, so the token-equality check means something). Both sides run in
this process, interleaved rep by rep, so machine load hits both alike; we report medians.

tok/s counts the new tokens of a whole `generate` call (prefill of the prompt included, the same for both).
The bandwidth bound: every decode step reads all weights except the embedding table (one row of it), so
tokens/s <= read bandwidth / weight bytes per token. Read bandwidth is measured here as the speed of `sum()`
over a 512 MiB tensor (read-only traffic, like weight streaming). The fraction is tok/s * the bytes each side
actually reads per token / bandwidth: transformers reads every weight; phiforge's greedy path reads the lm_head
through a screen (phiforge.decode.ArgmaxScreen: int8 codes, or a bf16 copy where no C compiler builds the native
kernel) plus the candidate rows it recomputes, counted on an untimed run of the same generation
(bench/decode_bytes.py), so its bytes are 20-30% below the nominal weight bytes. In bf16 the two sides round differently (phiforge fuses dense + fc2 into one fp32
accumulation where oneDNN's bf16 path exists), so greedy tokens part early; the bench prints each side's logit error against fp32 decoding of
the same weights instead.

On a shared machine wall-clock is noisy, so each side's process CPU time per token is printed as well (a second,
load-robust view of the same runs; the RESULT ratios are wall-clock).

Both sides: the same weights and dtype, prompt, greedy decoding, new tokens, threads (this process's), one
warm-up each, interleaved reps.

    flock /tmp/phiforge-bench.lock python bench/decode.py [--new-tokens 96] [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import warnings

import torch
from decode_bytes import bytes_per_token, count_screen
from rows import held_equal, row


def read_bandwidth(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Bytes/s of a large tensor sum (median of reps)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times)


def copy_bandwidth(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Bytes/s moved (read + written) by a large tensor copy_ (median of reps)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def build_model(seed: int = 0):
    from phiforge.config import preset
    from phiforge.model import Phi

    torch.manual_seed(seed)
    model = Phi(preset("phi-100m"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif "layernorm" in name:
                p.normal_(1.0, 0.02)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:  # unit-variance outputs per layer; a hotter lm_head spreads the logits
                p.normal_(0.0, (4.0 if name.startswith("lm_head") else 1.0) / math.sqrt(p.shape[1]))
    return model.eval()


def measure(ours_model, hf, prompt: list[int], n: int, reps: int) -> tuple[float, float, int]:
    """Median tok/s of phiforge and transformers (interleaved reps) and how many leading greedy tokens agree."""
    from phiforge.generate import GenerationConfig, generate_ids

    cfg = GenerationConfig(max_new_tokens=n)

    def ours() -> list[int]:
        return generate_ids(ours_model, [prompt], cfg)[0]

    def theirs() -> list[int]:
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()

    a, b = ours(), theirs()  # warm-up (and building our decode plan)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    t_ours, t_theirs, c_ours, c_theirs = [], [], [], []
    for _ in range(reps):
        for fn, times, cpu in ((ours, t_ours, c_ours), (theirs, t_theirs, c_theirs)):
            t, c = time.perf_counter(), time.process_time()
            out = fn()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            assert len(out) == n
    print(f"  cpu-time view: phiforge {n / statistics.median(c_ours):.1f}, transformers "
          f"{n / statistics.median(c_theirs):.1f} tok per cpu-second, ratio "
          f"{statistics.median(c_theirs) / statistics.median(c_ours):.2f}x")
    return n / statistics.median(t_ours), n / statistics.median(t_theirs), same


def logit_errors(ours_model, hf, ckpt_dir: str, steps: int = 32) -> tuple[float, float]:
    """Mean max |logit error| of phiforge's and transformers' low-precision decode steps against fp32 decoding of
    the same (already rounded) weights, on one teacher-forced random sequence."""
    from phiforge.checkpoint import load_checkpoint
    from phiforge.decode import Decoder

    ours = Decoder.build(ours_model)  # the decode steps generate_ids runs
    ref = load_checkpoint(ckpt_dir, dtype=torch.float32).eval()
    ref.load_state_dict({k: v.float() for k, v in ours_model.state_dict().items()})
    seq = torch.randint(0, ref.config.vocab_size, (1, 32 + steps), generator=torch.Generator().manual_seed(3))
    errs_ours, errs_theirs = [], []
    with torch.inference_mode():
        c_ref, c_ours = ref.new_cache(1, seq.shape[1]), ours_model.new_cache(1, seq.shape[1])
        ref(seq[:, :32], cache=c_ref)
        ours.step(seq[:, :32], c_ours)
        past = hf(seq[:, :32], use_cache=True).past_key_values
        for t in range(32, 32 + steps):
            exact = ref(seq[:, t:t + 1], cache=c_ref)[0, -1]
            errs_ours.append(float((ours.step(seq[:, t:t + 1], c_ours)[0, -1].float() - exact).abs().max()))
            out = hf(seq[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            errs_theirs.append(float((out.logits[0, -1].float() - exact).abs().max()))
    return statistics.mean(errs_ours), statistics.mean(errs_theirs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 new tokens, one rep")
    args = ap.parse_args()
    if args.quick:  # explicit flags still win
        ap.set_defaults(prompt_tokens=8, new_tokens=8, reps=1)
        args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from phiforge.checkpoint import save_checkpoint
    from phiforge.decode import plan_of
    from phiforge.generate import GenerationConfig, generate_ids

    hf_logging.set_verbosity_error()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bw = read_bandwidth()
    cbw = copy_bandwidth()
    print(f"read bandwidth (sum over 512 MiB fp32): {bw / 1e9:.1f} GB/s; copy bandwidth (copy_ of 512 MiB, "
          f"read + write): {cbw / 1e9:.1f} GB/s")
    base = build_model()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, base.config.vocab_size, (args.prompt_tokens,), generator=g).tolist()
    N = args.new_tokens
    ratios, fractions, copy_fractions = {}, {}, {}
    held = held_equal(f"weights and dtype, {args.prompt_tokens}-token prompt, greedy, {N} new tokens, "
                      f"{torch.get_num_threads()} threads, one warm-up each, {args.reps} interleaved reps (median)")
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(base, tmp)
        for name in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            ours_model = base.to(dtype)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
            weight_bytes = sum(p.numel() * p.element_size() for n, p in ours_model.named_parameters()
                               if "embed_tokens" not in n)
            ours_tps, theirs_tps, same = measure(ours_model, hf, prompt, N, args.reps)
            # what our greedy path read per token, counted on an untimed run of the same generation
            plan = plan_of(ours_model)
            screen = plan.screen if plan is not None else None
            count = None
            if screen is not None:
                with count_screen(screen) as count:
                    generate_ids(ours_model, [prompt], GenerationConfig(max_new_tokens=N))
            ours_bytes = bytes_per_token(weight_bytes, ours_model.lm_head, screen, count)
            ratios[name] = ours_tps / theirs_tps
            fractions[name] = ours_tps * ours_bytes / bw
            copy_fractions[name] = ours_tps * ours_bytes / cbw
            theirs_fraction = theirs_tps * weight_bytes / bw
            screened = "no screen" if count is None else (
                f"screen {screen.kind}: {count.rows / max(count.steps, 1):.1f} candidate rows a step, "
                f"{count.fallbacks} fallbacks in {count.steps} steps")
            print(f"[{name}] bytes read per token: transformers {weight_bytes / 1e6:.1f} MB (bound "
                  f"{bw / weight_bytes:.0f} tok/s), phiforge {ours_bytes / 1e6:.1f} MB ({screened})")
            print(f"[{name}] phiforge {ours_tps:.1f} tok/s, transformers {theirs_tps:.1f} tok/s, "
                  f"ratio {ratios[name]:.2f}x; bandwidth fraction phiforge {fractions[name]:.2f}, "
                  f"transformers {theirs_fraction:.2f}")
            row(f"batch-1 greedy decode, phi-100m shape, {name}", f"transformers generate ({name})",
                f"{name} weights, greedy, default cache", ours_tps, theirs_tps, "tok/s", "> 1x", held=held,
                note=f"fraction of read bandwidth (bytes actually read): phiforge {fractions[name]:.2f}, "
                     f"transformers {theirs_fraction:.2f}")
            print(f"[{name}] same greedy tokens as transformers: {same}/{N}"
                  + ("" if same == N else " (first difference at that index)"))
            if name != "fp32":  # rounding differs by kernel: say how close each side is to exact instead
                ours_err, theirs_err = logit_errors(ours_model, hf, tmp)
                print(f"[{name}] mean over 32 decode steps of the max |logit - fp32 logit| (same rounded weights, "
                      f"teacher-forced): phiforge {ours_err:.4f}, transformers {theirs_err:.4f}")
            del hf
    for name, ratio in ratios.items():
        print(f"RESULT decode_ratio_{name} {ratio:.2f} x")
    for name, frac in fractions.items():
        print(f"RESULT decode_bw_fraction_{name} {frac:.2f} of_sum_read_bandwidth")
    for name, frac in copy_fractions.items():
        print(f"RESULT decode_copy_bw_fraction_{name} {frac:.2f} of_copy_bandwidth")


if __name__ == "__main__":
    main()
