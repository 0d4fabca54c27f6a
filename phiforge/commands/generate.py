"""Generate text from a checkpoint directory (weights + tokenizer).

Greedy by default (--temperature 0); sampling with --temperature/--top-k/--top-p and a --seed for
reproducibility. A single prompt streams to the terminal as it is generated; several prompts run as one
left-padded batch and print when done. Throughput (new tokens/s) goes to stderr.

  phiforge generate --model runs/phi-100m/final "def fibonacci(n):" --max-new-tokens 64 --stop "\\ndef "
  phiforge generate --model phi-2-dir --quant int4 --verbose "Instruct: what is 2+2?\\nOutput:"

--quant int8|int4 quantizes the linear layers while loading (the float model is never held); --verbose says how
the model was loaded and which decode path and kernels run.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from phiforge.commands.flags import add_dtype, add_max_new_tokens, add_quant, check_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (several prompts form a batch)")
    parser.add_argument("--model", required=True,
                        help="checkpoint directory with config, weights and tokenizer (or phiforge:DIR, or a hub "
                             "id); a transformers model (smollm2, hf:DIR_OR_HUB_ID, a .gguf file) also works")
    add_max_new_tokens(parser, 128, "new tokens per prompt at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages tokens already in the text (HF semantics)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (same seed, same text)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when this text appears (repeatable); the text is cut before it")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-text token")
    add_quant(parser)
    add_dtype(parser, "weights dtype (default: as stored)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--no-stream", action="store_true", help="print the text only when it is complete")
    parser.add_argument("--verbose", action="store_true",
                        help="say on stderr how the model was loaded (time, size, peak memory) and which decode "
                             "path and kernels run")


def main(args: argparse.Namespace) -> int:
    from phiforge.checkpoint import load_checkpoint
    from phiforge.errors import ConfigError
    from phiforge.generate import GenerationConfig, generate, prepare_decoding
    from phiforge.lm.spec import checkpoint_dir, parse_spec
    from phiforge.serve.load import checkpoint_tokenizer

    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                           stop=[s.encode().decode("unicode_escape") for s in args.stop],
                           ignore_eos=args.ignore_eos)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    stream = sys.stdout if len(args.prompts) == 1 and not args.no_stream else None
    check_device(args.device)
    if parse_spec(args.model).kind in ("hf", "gguf", "alias"):
        # not a Phi (e.g. the bundled smollm2): the serving engine's transformers backend, same sampling
        texts, n, elapsed = _generate_hf(args, cfg, stream)
    else:
        path = checkpoint_dir(args.model)
        tokenizer = checkpoint_tokenizer(path)
        start = time.perf_counter()
        # quantized while loading, in the decode plan's layout (no weight copies)
        model = load_checkpoint(path, dtype=args.dtype, device=args.device, quant=args.quant,
                                group_size=args.group_size, layout="decode")
        if args.verbose:
            print(load_line(model, args.quant, time.perf_counter() - start), file=sys.stderr)
            print(prepare_decoding(model).describe(), file=sys.stderr, flush=True)
        if stream is not None:
            stream.write(args.prompts[0])
            stream.flush()
        n = 0

        def count(row: int, token_id: int) -> None:
            nonlocal n
            n += 1

        start = time.perf_counter()
        texts = generate(model, tokenizer, args.prompts, cfg, stream=stream, on_token=count)
        elapsed = time.perf_counter() - start
    if stream is None:
        for prompt, text in zip(args.prompts, texts):
            print(prompt + text)
            if len(args.prompts) > 1:
                print("-" * 40)
    print(f"[{n} tokens in {elapsed:.2f}s: {n / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


def load_line(model: Any, quant: str, seconds: float) -> str:
    """`--verbose`'s line on the load: what was loaded, the bytes the model holds, the process's peak memory."""
    import resource

    from phiforge.checkpoint import human_bytes

    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}  # views of one buffer counted once
    held = sum(storages.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:  # Linux: this process's own high-water mark (ru_maxrss carries over a parent's size through fork)
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        pass
    dtype = model.model.embed_tokens.weight.dtype
    what = f"{quant} linear layers and embedding, {str(dtype).removeprefix('torch.')} activations" if quant != "none" else \
        str(dtype).removeprefix("torch.")
    return f"load: {what}, {human_bytes(held)} of weights in {seconds:.1f}s (peak RSS {human_bytes(peak)})"


def _generate_hf(args: argparse.Namespace, cfg: Any, stream: Any) -> tuple[list[str], int, float]:
    """Generate with a transformers model through the serving engine: (texts, new tokens, seconds)."""
    from phiforge.lm.sampling import Sampling
    from phiforge.serve.engine import Request
    from phiforge.serve.load import load_engine

    engine = load_engine(args.model, quant=args.quant, dtype=args.dtype, device=args.device)  # --quant: an error
    if args.verbose:
        print(f"decode: {engine.backend} (the model's own forward, through transformers)", file=sys.stderr)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed,
                        repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_new_tokens,
                        stop=cfg.stop)
    requests = [Request(engine.tokenizer.encode(p), sampling=sampling, ignore_eos=cfg.ignore_eos)
                for p in args.prompts]
    if stream is not None:
        stream.write(args.prompts[0])
        stream.flush()

    def on_text(row: int, text: str, _logprob: Any) -> None:
        stream.write(text)
        stream.flush()

    start = time.perf_counter()
    results = engine.run(requests, on_text if stream is not None else None)
    elapsed = time.perf_counter() - start
    return [r.text for r in results], sum(len(r.token_ids) for r in results), elapsed
