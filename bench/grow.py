"""Benchmark: does growing a trained small Phi reach a large model's loss in fewer steps than training it from
scratch?  (Phi-2's "scaled knowledge transfer" from Phi-1.5; HyperCloning reports 2.2-4x.)

Protocol, all with phiforge's own training engine (phiforge.train.train) on the same packed token shards:
  1. train the SMALL model for S steps;
  2. grow it to the LARGE shape (phiforge.grow, default hyperclone + identity: function-preserving) and check
     that the grown model's validation loss at step 0 equals the small model's;
  3. train the grown model for T steps, and the LARGE model from scratch for T steps: same data order, same
     batch, same optimizer and schedule (warmup + cosine), so both large models see the same tokens;
  4. from the validation curves: the first step at which the grown model reaches the scratch model's final
     validation loss R, and the headline ratio = T / (R + the S small-model steps in large-step FLOP
     equivalents): growing is only cheaper than training from scratch if it is cheaper counting the small
     model's training too. Beside it, for comparison with papers that leave it out (HyperCloning's 2.2-4x),
     T / R (large-model steps only) and T / (R + S) (small steps counted as whole steps).

Data: the Python standard library's source (offline everywhere), with a BPE tokenizer trained on it.
The default shapes keep Phi-1.5 -> Phi-2's ratios (same heads, head dim x1.25 with the rotary dim kept, d x1.25,
layers x4/3, MLP 4d); `--shape x2` doubles the width instead (HyperCloning's setting).

    flock /tmp/phiforge-bench.lock python bench/grow.py --out runs/grow-bench

Writes results.json and a report (report.html + report.md, the `phiforge run` report format) into --out, and prints
`RESULT grow_ratio <x> x` (counting the small model by FLOPs) first, then the other ratios.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

from rows import held_equal, row

SHAPES = {
    # name: (small, large) ModelConfig fields; vocab_size is set from the tokenizer
    "phi2-ratio": (dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                        partial_rotary_factor=0.5),  # head_dim 32, rotary 16
                   dict(hidden_size=160, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
                        partial_rotary_factor=0.4)),  # head_dim 40, rotary 16
    "x2": (dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=3,
                partial_rotary_factor=0.5),
           dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=6,
                partial_rotary_factor=0.5)),
}


def build_corpus(path: Path, max_chars: int, doc_chars: int = 4000) -> int:
    """Python stdlib sources as JSONL documents of ~doc_chars characters (split at line boundaries)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total, n = 0, 0
    with open(path, "w") as f:
        for src in sorted(stdlib.glob("*.py")):
            text = src.read_text(encoding="utf-8", errors="replace")
            doc: list[str] = []
            size = 0
            for line in text.splitlines(keepends=True):
                doc.append(line)
                size += len(line)
                if size >= doc_chars:
                    f.write(json.dumps({"text": "".join(doc)}) + "\n")
                    n, total, doc, size = n + 1, total + size, [], 0
            if doc:
                f.write(json.dumps({"text": "".join(doc)}) + "\n")
                n, total = n + 1, total + size
            if total >= max_chars:
                break
    return n


def val_loss_of(model, data: Path, seq_len: int, batch: int, n_batches: int, device: str) -> float:
    """Validation loss on the first n_batches of the val split: the same batches as the training engine uses."""
    import torch
    import torch.nn.functional as F

    from phiforge.train.data import ChunkLoader, eval_batches

    loader = ChunkLoader(data, "val", seq_len, batch, shuffle=False)
    model = model.to(device).eval()
    model.rotary.reset(device)
    total = 0.0
    batches = eval_batches(loader, n_batches)
    with torch.no_grad():
        for x, y in batches:
            logits = model(x.to(device))
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten()).item()
    return total / len(batches)


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose validation loss is <= target (None if never)."""
    return next((s for s, v in curve if v <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/grow-bench", help="output directory (default: runs/grow-bench)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="phi2-ratio", help="small/large shapes")
    ap.add_argument("--small-steps", type=int, default=400, help="S: steps for the small model")
    ap.add_argument("--steps", type=int, default=400, help="T: steps for each large model")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the corpus")
    ap.add_argument("--corpus-chars", type=int, default=6_000_000, help="stdlib characters to use")
    ap.add_argument("--width-method", default="hyperclone")
    ap.add_argument("--depth-method", default="identity")
    ap.add_argument("--noise", type=float, default=0.0, help="symmetry-breaking noise for grow()")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--scale", type=int, default=1,
                    help="multiply widths by this (e.g. 4 on a GPU: d 512 -> 640); heads scale too")
    ap.add_argument("--keep-work", action="store_true", help="keep the corpus, tokens and checkpoints in out/work")
    ap.add_argument("--quick", action="store_true", help="smoke test: a small corpus, 20 + 20 steps")
    args = ap.parse_args()
    if args.quick:  # explicit flags still win
        ap.set_defaults(out="runs/grow-bench-quick", small_steps=20, steps=20, seq_len=64, batch=8, warmup=5,
                        eval_every=5, eval_batches=2, vocab=512, corpus_chars=400_000)
        args = ap.parse_args()

    import shutil

    import torch

    from phiforge.checkpoint import load_checkpoint, save_checkpoint
    from phiforge.config import ModelConfig, pad_vocab
    from phiforge.data.pack import pack_corpus
    from phiforge.grow import grow_model
    from phiforge.train import TrainConfig, train
    from phiforge.train.metrics import read_log

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t_start = time.perf_counter()

    # ---- data ---------------------------------------------------------------------------------------------
    n_docs = build_corpus(work / "stdlib.jsonl", args.corpus_chars)
    packed = pack_corpus([work / "stdlib.jsonl"], work / "tokens", train_vocab=args.vocab, val_fraction=0.05,
                         workers=1)
    man = packed.manifest
    print(f"corpus: {n_docs} docs, {man['splits']['train']['tokens']:,} train / {man['splits']['val']['tokens']:,} "
          f"val tokens, vocab {man['vocab_size']}")
    vocab = pad_vocab(int(man["vocab_size"]))
    small_f, large_f = SHAPES[args.shape]

    def cfg_of(fields: dict) -> ModelConfig:
        f = dict(fields)
        for k in ("hidden_size", "intermediate_size", "num_attention_heads"):
            f[k] *= args.scale
        return ModelConfig(**f, vocab_size=vocab, max_position_embeddings=max(512, args.seq_len),
                           eos_token_id=int(man["eos_token_id"]), bos_token_id=int(man["eos_token_id"]))

    small_cfg, large_cfg = cfg_of(small_f), cfg_of(large_f)

    def write_cfg(cfg: ModelConfig, name: str) -> str:
        p = work / f"{name}.json"
        p.write_text(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "name"}))
        return str(p)

    def run(model: str, name: str, steps: int):
        tc = TrainConfig(model=model, data=str(work / "tokens"), out=str(work / name), seq_len=args.seq_len,
                         micro_batch=args.batch, max_steps=steps, lr=args.lr, min_lr=args.lr / 10,
                         warmup=args.warmup, eval_every=args.eval_every, eval_batches=args.eval_batches,
                         save_every=0, keep_last=1, log_every=10, seed=0, device=device)
        t0 = time.perf_counter()
        res = train(tc)
        curve = [(int(r["step"]), float(r["val_loss"])) for r in read_log(res.log_path, "eval")]
        print(f"{name}: {steps} steps in {time.perf_counter() - t0:.0f}s, final val loss {res.val_loss:.4f}")
        return res, curve

    # ---- 1. small ------------------------------------------------------------------------------------------
    small_res, small_curve = run(write_cfg(small_cfg, "small"), "small", args.small_steps)
    # ---- 2. grow -------------------------------------------------------------------------------------------
    small = load_checkpoint(small_res.checkpoint, dtype=torch.float32)
    grown, report = grow_model(small, large_cfg, width_method=args.width_method, depth_method=args.depth_method,
                               noise=args.noise, seed=0)
    print(report.format())
    save_checkpoint(grown, work / "grown-init", tokenizer=work / "tokens" / "tokenizer")
    v_small = val_loss_of(small, work / "tokens", args.seq_len, args.batch, args.eval_batches, device)
    v_grown0 = val_loss_of(grown, work / "tokens", args.seq_len, args.batch, args.eval_batches, device)
    print(f"step-0 val loss: small {v_small:.5f}, grown {v_grown0:.5f} (diff {abs(v_small - v_grown0):.2e})")
    # ---- 3. large: grown vs scratch (the scratch model has the grown config, eps included) -----------------
    scratch_cfg = report.config
    scratch_res, scratch_curve = run(write_cfg(scratch_cfg, "large"), "scratch", args.steps)
    grown_res, grown_curve = run(str(work / "grown-init"), "grown", args.steps)
    grown_curve = [(0, v_grown0), *grown_curve]
    held = held_equal(f"engine, token shards, data order, batch {args.batch} x {args.seq_len}, AdamW lr {args.lr:g}, "
                      f"warmup {args.warmup} + cosine, T = {args.steps} steps, device {device}; the grown run is "
                      f"charged the small model's {args.small_steps} steps by FLOPs")

    # ---- 4. the ratio --------------------------------------------------------------------------------------
    target = scratch_res.val_loss
    reach = first_step_reaching(grown_curve, target)
    S, T = args.small_steps, args.steps
    f_small, f_large = small_cfg.flops_per_token(args.seq_len), scratch_cfg.flops_per_token(args.seq_len)
    small_equiv = S * f_small / f_large  # the small model's steps in large-model FLOPs
    if reach is None:
        ratio = ratio_with_small = ratio_flops = None
    else:
        ratio = T / max(reach, 1)
        ratio_with_small = T / (reach + S)
        ratio_flops = T / (reach + small_equiv)
    results = {
        "benchmark": "grow", "shape": args.shape, "device": device, "scale": args.scale,
        "small_config": small_cfg.to_dict(), "large_config": scratch_cfg.to_dict(),
        "small_params": small.num_params(), "large_params": grown.num_params(),
        "width_method": args.width_method, "depth_method": args.depth_method, "noise": args.noise,
        "grow_exact": report.exact, "grow_report": report.to_dict()["parts"],
        "train": {"seq_len": args.seq_len, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
                  "schedule": "cosine", "small_steps": S, "large_steps": T,
                  "tokens_per_step": args.seq_len * args.batch},
        "val_loss": {"small_final": small_res.val_loss, "small_step0_check": v_small, "grown_step0": v_grown0,
                     "scratch_final": scratch_res.val_loss, "grown_final": grown_res.val_loss},
        "grown_steps_to_scratch_final": reach,
        "grow_ratio": ratio_flops,  # the headline: the small model's training counted by FLOPs
        "grow_step_ratio": ratio,
        "grow_step_ratio_counting_small_steps": ratio_with_small,
        "grow_step_ratio_counting_small_flops": ratio_flops,
        "small_steps_in_large_flops": small_equiv,
        "curves": {"small": small_curve, "scratch": scratch_curve, "grown": grown_curve},
        "seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))

    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "not reached" if x is None else format(x, spec)

    from phiforge.report import Document, figure_png

    doc = Document(f"Grow benchmark ({args.shape}, {device})")
    doc.paragraph(
        f"small {small.num_params():,} params (d {small_cfg.hidden_size}, {small_cfg.num_hidden_layers} layers) -> "
        f"large {grown.num_params():,} params (d {scratch_cfg.hidden_size}, {scratch_cfg.num_hidden_layers} "
        f"layers); grow: {args.width_method} + {args.depth_method}, noise {args.noise:g}, "
        f"{'exact' if report.exact else 'approximate'}. {args.batch}x{args.seq_len} tokens/step, AdamW lr "
        f"{args.lr:g} warmup {args.warmup} + cosine, same data order for both large runs.")
    table = [
        ["small model: steps S / final val loss", f"{S} / {small_res.val_loss:.4f}"],
        [f"grown model val loss at step 0 (small model: {v_small:.4f})", f"{v_grown0:.4f}"],
        ["scratch large model: steps T / final val loss", f"{T} / {scratch_res.val_loss:.4f}"],
        ["grown large model: final val loss after T steps", f"{grown_res.val_loss:.4f}"],
        ["grown steps R to reach the scratch final val loss", fmt(reach, "d")],
        [f"headline: T / (R + the S small steps by FLOPs, {small_equiv:.0f} large-step equivalents)",
         f"{fmt(ratio_flops)}x"],
        ["T / (R + S), the small steps counted as whole steps", f"{fmt(ratio_with_small)}x"],
        ["T / R, large-model steps only (leaves out the small model's training)", f"{fmt(ratio)}x"],
    ]
    doc.table(["quantity", "value"], table)
    doc.heading("Exactness of the growth")
    doc.table(["part", "exact", "how"], [[p["name"], "exact" if p["exact"] else "approximate", p["how"]]
                                        for p in report.to_dict()["parts"]])
    doc.heading("Validation loss")

    def plot(ax):
        ax.plot(*zip(*scratch_curve), label="large from scratch")
        ax.plot(*zip(*grown_curve), label=f"grown ({args.width_method}+{args.depth_method})")
        ax.plot([s - S for s, _ in small_curve], [v for _, v in small_curve], label="small (steps before growth)",
                alpha=0.6)
        ax.axhline(target, color="gray", ls=":", lw=1)
        if reach is not None:
            ax.axvline(reach, color="gray", ls=":", lw=1)
        ax.set_xlabel("large-model step (small model: negative steps)")
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=min(max(v for _, v in scratch_curve), small_curve[0][1]) + 0.2)
        ax.legend()
        ax.set_title(f"grow benchmark: {fmt(ratio_flops)}x fewer FLOPs counting the small model")

    doc.figure("loss_curves", figure_png(plot), "validation loss curves")
    paths = doc.write(out)
    print("\n".join(f"{k}: {v}" for k, v in table))
    if not args.keep_work:
        shutil.rmtree(work)  # checkpoints and token shards: only the results stay
    print(f"wrote {out}/results.json, {paths['html']}, {paths['markdown']} ({time.perf_counter() - t_start:.0f}s)")
    print(f"RESULT grow_ratio {fmt(ratio_flops)} x")  # the headline: the small model's training counted by FLOPs
    print(f"RESULT grow_step_ratio_counting_small_steps {fmt(ratio_with_small)} x")
    print(f"RESULT grow_step_ratio_large_steps_only {fmt(ratio)} x")
    print(f"RESULT grow_step0_val_loss_diff {abs(v_small - v_grown0):.2e} nats")
    cost = None if reach is None else reach + small_equiv
    row(f"growth to reach scratch val loss ({args.shape}: {small.num_params() / 1e6:.1f}M -> "
        f"{grown.num_params() / 1e6:.1f}M)", "the large model from scratch",
        f"same engine, data and schedule, {T} steps", cost, T, "large-step FLOP equivalents", "> 1x",
        ratio=ratio_flops, held=held,
        note=f"small model counted by FLOPs; large-model steps only: {fmt(ratio)}x")


if __name__ == "__main__":
    main()
