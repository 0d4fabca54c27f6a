"""Training throughput on CPU: phiforge's train step vs a plain PyTorch loop over transformers.PhiForCausalLM.

Both train the same Phi config (a few layers, vocab 8k, seq 256) from the same initial weights on the same
batches with the same AdamW hyper-parameters (lr, betas, eps, weight decay) and gradient clipping, in fp32.
The peer is the loop everyone writes first:

    loss = hf(input_ids, labels=input_ids).loss; loss.backward(); clip; opt.step(); opt.zero_grad()

ours is phiforge.train's step (CausalLMLoss + forward_backward + the fused AdamW of build_optimizer), prepared by
prepare_model as `phiforge train` does: on CPU that routes fp32 matmuls through oneDNN (train/onednn.py), which
on AMD CPUs runs ~2x faster than the MKL sgemm torch uses by default (the peer's path); `--cpu-matmul torch`
measures ours on MKL too, to separate that from the rest of the engine. MFU is against the faster of the two
libraries' measured peak. Rounds
are interleaved (ours, peer, ours, ...) so machine load hits both alike; we report median tokens/s, the ratio,
and our MFU against the CPU's measured matmul peak.

    flock /tmp/phiforge-bench.lock python bench/train.py [--rounds 5] [--steps 3] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


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
    ap.add_argument("--cpu-matmul", choices=["auto", "torch"], default="auto",
                    help="our fp32 CPU matmuls: auto (oneDNN, phiforge's default) or torch (MKL, as the peer)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from phiforge.config import ModelConfig
    from phiforge.model import Phi
    from phiforge.train.config import TrainConfig
    from phiforge.train.loop import forward_backward
    from phiforge.train.metrics import cpu_peak_flops, measure_cpu_peak
    from phiforge.train.optim import build_optimizer
    from phiforge.train.parallel import CausalLMLoss, Dist, prepare_model

    mc = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                     num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                     max_position_embeddings=args.seq + 1, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    cfg = TrainConfig(max_steps=1, seq_len=args.seq, micro_batch=args.batch, lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                      weight_decay=0.1, grad_clip=1.0, compile=args.compile, cpu_matmul=args.cpu_matmul)
    torch.manual_seed(0)
    phi = Phi(mc).train()
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(**mc.to_hf())).train()
    hf.load_state_dict(phi.state_dict(), strict=False)  # the same initial weights

    ours = prepare_model(CausalLMLoss(phi), cfg, Dist())
    opt_ours = build_optimizer(ours, cfg)
    params_ours = [p for p in ours.parameters() if p.requires_grad]
    # The peer's AdamW: the same hyper-parameters and the same no-decay groups, torch's default implementation.
    decay = [p for n, p in hf.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in hf.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt_hf = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

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

    def step_ours() -> float:
        b = batch()
        loss, _ = forward_backward(ours, params_ours, [(b[:, :-1], b[:, 1:])], cfg.grad_clip, torch.device("cpu"),
                                   autocast)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return float(loss.detach())

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

    if args.check:
        b = data[0]
        with torch.no_grad():
            a = float(ours(b[:, :-1], b[:, 1:]))
            h = float(hf(input_ids=b, labels=b).loss)
        print(f"initial loss: ours {a:.6f}  transformers {h:.6f}")

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return args.steps * tokens_per_step / (time.perf_counter() - t0)

    timed(step_ours), timed(step_hf)  # warm-up (allocator, thread pools, compile)
    ours_tps, hf_tps, peaks = [], [], []
    peak_dtype = amp_dtype or torch.float32
    for r in range(args.rounds):
        ours_tps.append(timed(step_ours))
        hf_tps.append(timed(step_hf))
        peaks.append(measure_cpu_peak(peak_dtype, seconds=0.5))  # interleaved too: the same load as the steps
        print(f"round {r}: phiforge {ours_tps[-1]:,.0f} tok/s   transformers {hf_tps[-1]:,.0f} tok/s   "
              f"matmul peak {peaks[-1] / 1e9:.0f} GFLOP/s", flush=True)
    o, h = statistics.median(ours_tps), statistics.median(hf_tps)
    peak = max(max(peaks), cpu_peak_flops(peak_dtype))
    fpt = mc.flops_per_token(args.seq)
    print(f"model: {phi.num_params() / 1e6:.1f}M params, {args.layers} layers x {args.hidden}, vocab {args.vocab}, "
          f"batch {args.batch} x {args.seq}, threads {torch.get_num_threads()}, compile {args.compile}, dtype {args.dtype}, our cpu matmul {args.cpu_matmul}")
    print(f"CPU {args.dtype} matmul peak (measured, best): {peak / 1e9:.1f} GFLOP/s; {fpt / 1e6:.1f} MFLOP/token")
    sfx = "" if args.dtype == "fp32" else f"_{args.dtype}"
    print(f"RESULT train_tokens_per_s_phiforge{sfx} {o:.0f} tok/s")
    print(f"RESULT train_tokens_per_s_transformers{sfx} {h:.0f} tok/s")
    print(f"RESULT train_mfu_phiforge{sfx} {100 * o * fpt / peak:.1f} %")
    print(f"RESULT train_mfu_transformers{sfx} {100 * h * fpt / peak:.1f} %")
    print(f"RESULT train_ratio{sfx} {o / h:.2f} x")


if __name__ == "__main__":
    main()
