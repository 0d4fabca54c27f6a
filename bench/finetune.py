"""Fine-tuning throughput: packed examples (phiforge) vs the same examples padded one per row (the naive way).

Both sides train the same tiny Phi from the same initial weights on the same prompt/completion examples, with
the loss on completion tokens only, the same micro-batch of rows of seq_len positions, the same AdamW step per
micro-batch and the same threads:

    packed  phiforge's ExampleLoader: whole examples packed into rows (next-fit), a block-diagonal attention
            mask and positions restarting per example (what `phiforge train` does with --format completion data)
    padded  each example alone in a row, padded to seq_len at the end, plain causal attention (what a simple
            fine-tuning loop does)

Both process every example once per round (an epoch); rounds are interleaved (packed, padded, ...) so machine
load hits both alike, and the median is reported. Tokens/s counts example tokens (inputs), not padding, so the
ratio should be close to the padding packing saves: padded rows / packed rows, printed beside it.

    flock /tmp/phiforge-bench.lock python bench/finetune.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rows import held_equal, row

WORDS = ["def", "return", "for", "in", "range", "if", "else", "while", "list", "dict", "sum", "total", "value", "index", "result", "item", "count", "print", "self", "append", "len", "str", "int", "float", "import", "class", "lambda", "yield", "True", "False", "None"]


def write_exercises(path: Path, n: int, prompt_words: tuple[int, int], completion_words: tuple[int, int]) -> None:
    """n prompt/completion records with lengths drawn uniformly from the given word ranges."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*prompt_words)))
            c = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*completion_words)))
            f.write(json.dumps({"prompt": f'def f():\n    """{p}"""\n', "completion": f"    {c}\n"}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--seq", type=int, default=512, help="seq_len: positions per row")
    ap.add_argument("--batch", type=int, default=4, help="rows per micro-batch (one optimizer step each)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--prompt-words", type=int, nargs=2, default=(10, 80))
    ap.add_argument("--completion-words", type=int, nargs=2, default=(5, 80))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke test: a tiny model, few examples, one round")
    args = ap.parse_args()
    if args.quick:  # explicit flags still win
        ap.set_defaults(examples=48, seq=128, layers=2, hidden=64, prompt_words=(5, 20), completion_words=(2, 20),
                        rounds=1)
        args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from phiforge.config import ModelConfig, pad_vocab
    from phiforge.data.pack import pack_corpus
    from phiforge.model import Phi
    from phiforge.train.config import TrainConfig
    from phiforge.train.data import Batch, ExampleLoader
    from phiforge.train.loop import forward_backward
    from phiforge.train.optim import build_optimizer
    from phiforge.train.parallel import CausalLMLoss, Dist, prepare_model

    work = Path(tempfile.mkdtemp(prefix="phiforge-finetune-bench-"))
    write_exercises(work / "ex.jsonl", args.examples, tuple(args.prompt_words), tuple(args.completion_words))
    m = pack_corpus([work / "ex.jsonl"], work / "tok", train_vocab=512, records="completion", seq_len=args.seq,
                    val_fraction=0.0, workers=1).manifest
    loader = ExampleLoader(work / "tok", "train", args.seq, args.batch, shuffle=False)
    n_ex = loader.packing_stats()["examples"]
    mc = ModelConfig(vocab_size=pad_vocab(m["vocab_size"]), hidden_size=args.hidden,
                     intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=max(1, args.hidden // 64), max_position_embeddings=args.seq,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    cfg = TrainConfig(max_steps=1, seq_len=args.seq, micro_batch=args.batch, lr=1e-4, grad_clip=1.0)
    torch.manual_seed(0)
    phi = Phi(mc).train()

    # The batches of one epoch, both ways (built ahead: the timing covers the training steps).
    packed = []
    for i in range(0, loader.n_chunks, args.batch):
        rows = [loader.row(r) for r in range(i, min(i + args.batch, loader.n_chunks))]
        packed.append(Batch(*(torch.from_numpy(np.stack(x)) for x in zip(*rows))))
    padded = []
    T = args.seq
    for i in range(0, n_ex, args.batch):
        rows = []
        for e in range(i, min(i + args.batch, n_ex)):
            ids, mask = loader.example(e)
            n = len(ids) - 1
            inp = torch.full((T,), loader.eos, dtype=torch.long)
            tgt = torch.full((T,), loader.eos, dtype=torch.long)
            lm = torch.zeros(T, dtype=torch.bool)
            inp[:n], tgt[:n], lm[:n] = torch.from_numpy(ids[:-1]), torch.from_numpy(ids[1:]), torch.from_numpy(
                mask[1:] == 1)
            rows.append((inp, tgt, lm))
        padded.append(Batch(*(torch.stack(x) for x in zip(*rows)), None, None))
    example_tokens = int(loader.offsets[-1]) - n_ex  # input positions that hold example tokens
    assert sum(int(b.loss_mask.sum()) for b in packed) == sum(int(b.loss_mask.sum()) for b in padded)

    def side(batches):
        model = prepare_model(CausalLMLoss(copy.deepcopy(phi)), cfg, Dist())
        opt = build_optimizer(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]

        def epoch() -> float:
            t0 = time.perf_counter()
            for b in batches:
                forward_backward(model, params, [b], cfg.grad_clip, torch.device("cpu"), contextlib.nullcontext)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return example_tokens / (time.perf_counter() - t0)

        return epoch

    sides = {"packed": side(packed), "padded": side(padded)}
    for fn in sides.values():  # warm-up: allocator, thread pools
        fn()
    tps: dict[str, list[float]] = {k: [] for k in sides}
    held = held_equal(f"model ({phi.num_params() / 1e6:.1f}M params, {args.layers} layers x {args.hidden}), initial "
                      f"weights, the same {n_ex} examples ({example_tokens:,} tokens) once per round, loss on "
                      f"completion tokens, {args.batch} rows x {T} positions per AdamW step, fp32, "
                      f"{torch.get_num_threads()} threads, one warm-up epoch each, {args.rounds} interleaved rounds "
                      f"(median)")
    for r in range(args.rounds):
        for k, fn in sides.items():
            tps[k].append(fn())
        print(f"round {r}: " + "   ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in tps.items()), flush=True)
    med = {k: statistics.median(v) for k, v in tps.items()}
    saved = (len(padded) * args.batch) / (len(packed) * args.batch)
    stats = loader.packing_stats()
    print(f"packing: {n_ex} examples in {stats['rows']} rows of {T} ({100 * stats['fill']:.0f}% filled) vs {n_ex} "
          f"padded rows ({100 * example_tokens / (n_ex * T):.0f}% filled): {saved:.2f}x fewer positions")
    ratio = med["packed"] / med["padded"]
    print(f"RESULT finetune_tokens_per_s_packed {med['packed']:.0f} tok/s")
    print(f"RESULT finetune_tokens_per_s_padded {med['padded']:.0f} tok/s")
    print(f"RESULT finetune_packed_vs_padded {ratio:.2f} x")
    row(f"fine-tuning step, packed examples ({phi.num_params() / 1e6:.1f}M params, seq {T})",
        "the same examples padded one per row", "causal attention, loss on completion tokens, same step", med["packed"],
        med["padded"], "tok/s", f"~{saved:.1f}x (the padding saved)", held=held)


if __name__ == "__main__":
    main()
