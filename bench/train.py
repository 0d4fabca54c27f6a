"""Training throughput on CPU: phiforge's train step vs a plain PyTorch loop over transformers.PhiForCausalLM.

Both train the same Phi config (a few layers, vocab 8k, seq 256) from the same initial weights on the same
batches with the same AdamW hyper-parameters (lr, betas, eps, weight decay) and gradient clipping, in fp32, on
the same threads. The peer is the loop a competent transformers user writes, with torch's fused AdamW (the
default AdamW on CPU is a per-parameter loop; phiforge uses the fused kernel, so the peer gets it too):

    loss = hf(input_ids, labels=input_ids).loss; loss.backward(); clip; opt.step(); opt.zero_grad()

ours is phiforge.train's step (CausalLMLoss + forward_backward + build_optimizer's AdamW), prepared by
prepare_model as `phiforge train` does: on CPU that routes fp32 matmuls through oneDNN (train/onednn.py), which
on AMD CPUs runs ~2x faster than the MKL sgemm torch uses by default (the peer's path) and on Intel CPUs about
the same. That gain is a library choice, not the engine's, so ours runs twice: as shipped (oneDNN) and with
`cpu_matmul: torch` (MKL, like the peer). Two ratios: engine only (both on MKL) and total (ours as shipped).
MFU is against the faster of the two libraries' measured peak. Rounds are interleaved (ours, ours on MKL,
peer, ...) so machine load hits all alike; we report median tokens/s.

    flock /tmp/phiforge-bench.lock python bench/train.py [--rounds 5] [--steps 3] [--compile] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import time

import torch
from rows import held_equal, row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per round and side")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile our blocks")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="fp32 (phiforge's CPU default), or bf16 autocast on both sides")
    ap.add_argument("--check", action="store_true", help="also check that both sides compute the same loss")
    ap.add_argument("--quick", action="store_true", help="smoke test: a tiny model, one short round")
    args = ap.parse_args()
    if args.quick:  # explicit flags still win
        ap.set_defaults(layers=2, hidden=128, vocab=2048, seq=64, batch=4, rounds=1, steps=2)
        args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from phiforge.config import ModelConfig
    from phiforge.model import Phi
    from phiforge.train import onednn
    from phiforge.train.config import TrainConfig
    from phiforge.train.loop import forward_backward
    from phiforge.train.metrics import cpu_peak_flops, measure_cpu_peak
    from phiforge.train.optim import build_optimizer
    from phiforge.train.parallel import CausalLMLoss, Dist, prepare_model

    mc = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                     num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                     max_position_embeddings=args.seq + 1, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    cfg = TrainConfig(max_steps=1, seq_len=args.seq, micro_batch=args.batch, lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                      weight_decay=0.1, grad_clip=1.0, compile=args.compile)
    torch.manual_seed(0)
    phi = Phi(mc).train()
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(**mc.to_hf())).train()
    hf.load_state_dict(phi.state_dict(), strict=False)  # the same initial weights

    def engine(cpu_matmul: str):
        """(model, optimizer, params) of phiforge's step with the given CPU matmul library."""
        c = dataclasses.replace(cfg, cpu_matmul=cpu_matmul)
        m = copy.deepcopy(phi)
        model = prepare_model(CausalLMLoss(m), c, Dist())
        return model, build_optimizer(model, c), [p for p in model.parameters() if p.requires_grad]

    # ours as shipped; ours on MKL only where that differs (oneDNN serves fp32 without autocast or compile)
    variants = {"phiforge": engine("auto")}
    split_library = args.dtype == "fp32" and not args.compile and onednn.available()
    if split_library:
        variants["phiforge_mkl"] = engine("torch")
    # The peer's AdamW: the same hyper-parameters and no-decay groups, torch's fused kernel (as ours).
    decay = [p for n, p in hf.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in hf.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt_hf = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                               fused=True)

    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, args.vocab, (64, args.batch, args.seq + 1), generator=g)  # (batches, B, T+1)
    tokens_per_step = args.batch * args.seq
    k = [0]

    def batch() -> torch.Tensor:
        k[0] += 1
        return data[k[0] % len(data)]

    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None

    def autocast():
        return torch.autocast("cpu", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def step_of(model, opt, params):
        def step() -> float:
            b = batch()
            loss, _ = forward_backward(model, params, [(b[:, :-1], b[:, 1:])], cfg.grad_clip, torch.device("cpu"),
                                       autocast)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
        return step

    def step_hf() -> float:
        b = batch()
        # input_ids of T+1 tokens: HF shifts labels inside, predicting T tokens like ours.
        with autocast():
            loss = hf(input_ids=b, labels=b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return float(loss.detach())

    steps = {name: step_of(*v) for name, v in variants.items()}
    steps["transformers"] = step_hf
    if args.check:
        b = data[0]
        with torch.no_grad():
            a = float(variants["phiforge"][0](b[:, :-1], b[:, 1:]))
            h = float(hf(input_ids=b, labels=b).loss)
        print(f"initial loss: ours {a:.6f}  transformers {h:.6f}")

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return args.steps * tokens_per_step / (time.perf_counter() - t0)

    for fn in steps.values():  # warm-up (allocator, thread pools, compile) for every side
        timed(fn)
    tps: dict[str, list[float]] = {name: [] for name in steps}
    peaks = []
    peak_dtype = amp_dtype or torch.float32
    held = held_equal(f"model, initial weights, batches ({args.batch} x {args.seq}), {args.dtype}, "
                      f"{torch.get_num_threads()} threads, AdamW hyper-parameters and no-decay groups (fused kernel "
                      f"both sides), grad clip, one warm-up pass each, {args.rounds} interleaved rounds (median)")
    for r in range(args.rounds):
        for name, fn in steps.items():
            tps[name].append(timed(fn))
        peaks.append(measure_cpu_peak(peak_dtype, seconds=0.5))  # interleaved too: the same load as the steps
        print(f"round {r}: " + "   ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in tps.items())
              + f"   matmul peak {peaks[-1] / 1e9:.0f} GFLOP/s", flush=True)
    med = {k: statistics.median(v) for k, v in tps.items()}
    o, h = med["phiforge"], med["transformers"]
    peak = max(max(peaks), cpu_peak_flops(peak_dtype))
    fpt = mc.flops_per_token(args.seq)
    print(f"model: {phi.num_params() / 1e6:.1f}M params, {args.layers} layers x {args.hidden}, vocab {args.vocab}, "
          f"batch {args.batch} x {args.seq}, threads {torch.get_num_threads()}, compile {args.compile}, "
          f"dtype {args.dtype}, oneDNN matmuls {'on' if split_library else 'not used'}")
    print(f"CPU {args.dtype} matmul peak (measured, best): {peak / 1e9:.1f} GFLOP/s; {fpt / 1e6:.1f} MFLOP/token")
    sfx = "" if args.dtype == "fp32" else f"_{args.dtype}"
    print(f"RESULT train_tokens_per_s_phiforge{sfx} {o:.0f} tok/s")
    print(f"RESULT train_tokens_per_s_transformers{sfx} {h:.0f} tok/s")
    print(f"RESULT train_mfu_phiforge{sfx} {100 * o * fpt / peak:.1f} %")
    print(f"RESULT train_mfu_transformers{sfx} {100 * h * fpt / peak:.1f} %")
    print(f"RESULT train_ratio{sfx} {o / h:.2f} x")
    peer = "transformers PhiForCausalLM loop"
    setting = f"torch AdamW(fused=True), MKL sgemm (torch's default), {args.dtype}"
    workload = f"training step ({args.dtype}, {phi.num_params() / 1e6:.0f}M params)"
    if split_library:
        m = med["phiforge_mkl"]
        print(f"RESULT train_tokens_per_s_phiforge_mkl{sfx} {m:.0f} tok/s")
        print(f"RESULT train_ratio_engine_only{sfx} {m / h:.2f} x")
        print(f"RESULT train_onednn_gain{sfx} {o / m:.2f} x")
        row(f"{workload}, engine only (both on MKL)", peer, setting, m, h, "tok/s", "> 1x", held=held)
        row(f"{workload}, total (phiforge on oneDNN)", peer, setting, o, h, "tok/s", "> 1x", held=held,
            note=f"oneDNN vs MKL alone: {o / m:.2f}x on this CPU (a library choice, not the engine)")
    else:
        row(workload, peer, setting, o, h, "tok/s", "> 1x", held=held)


if __name__ == "__main__":
    main()
