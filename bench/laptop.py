"""Benchmark: Phi-2 on a laptop. phiforge int8 / int4 against llama.cpp Q8_0 / Q4_0 on the same weights.

    flock /tmp/phiforge-bench.lock python bench/laptop.py              # the phi-2 shape (lead's quiet machine)
    python bench/laptop.py --quick                                    # a small shape end to end (smoke test)

What it measures (`RESULT <name> <value> <unit>` lines and `ROW {json}` rows for bench/all.py's table):

1. Weights: a phi-2-shaped model (config.py's `phi-2` preset: 32 layers, d 2560, MLP 10240, vocab 51200) with
   random weights, written once in bf16 safetensors shards (5.6 GB; fp32 would be 11 GB) into --workdir, and
   exported from there with phiforge's own GGUF exporter to q8_0 and q4_0 (`phiforge export gguf`): llama.cpp
   and phiforge read the same numbers. Reused across runs (same seed, same files).
2. llama.cpp: llama-cpp-python built from PyPI's *source* sdist (-DGGML_NATIVE=ON: -march=native) into
   ~/.cache/phiforge/llama-cpp/ on first use (many minutes on 2 cores; the build log is kept there). If it cannot
   be built, the bench says why and prints phiforge's figures alone. Driven through its C API (llama_decode on
   token ids, greedy argmax over the logits): no Python sampler, no logits buffer of n_ctx x vocab.
3. Speed, each variant in its own process, loaded once and kept for its share of the rounds: --generations (2)
   sets of processes one after another, each a fresh process per variant (on a VM the read bandwidth can swing
   for seconds to minutes at a time, on the 2-core bench VM between ~35 and ~62 GB/s for the same buffer in the same
   process, and a run's processes may land in different places: each side gets more than one period); the same
   threads (--threads: OpenMP / torch for phiforge, n_threads and n_threads_batch for llama.cpp), round-robin
   rounds (--rounds, 6) so machine load falls on all alike:
   - decode tok/s: (N - 1) / (fastest N-token run - fastest 1-token run) after a 16-token prompt, greedy; and
     the median over rounds of each round's (N - 1) / (N-token run - 1-token run), in a note on the decode rows
     with every round's figure and the bandwidth range: a memory-bound decoder's fastest and typical runs part
     when the bandwidth swings, a compute-bound one's hardly;
   - prefill tok/s: a --prompt-len (512) token prompt from an empty cache to its first token, fastest run;
   - peak RSS: the process's own high-water mark at the end (VmHWM, loading included; ru_maxrss would carry the
     parent's RSS at fork), and its RSS before loading (the runtime: Python + torch for phiforge, Python +
     libllama for llama.cpp) to show what the weights cost. llama.cpp reads its weights in (--no-mmap): mapped,
     the clean file pages its Q4_0 repacking leaves resident would count (see LlamaRunner);
   - fraction of measured read bandwidth: weight bytes a decode step reads x decode tok/s / the read bandwidth
     measured (a 1 GiB sum, all threads) right before and after that variant's runs, per round; median of rounds.
4. Quality: a trained small Phi (--model DIR, else one trained here on the standard library's source for
   --train-steps): perplexity of phiforge int8 / int4 against phiforge fp32, and of llama.cpp Q8_0 / Q4_0 against
   llama.cpp F32, on the same held-out token windows (256 tokens each from an empty context), the deltas side by
   side; and whether llama.cpp's tokenizer (from our GGUF) gives the same ids as ours on the held-out text.

Goals (issue 21, judged by the lead from a quiet-machine run): decode >= 1.3x llama.cpp at equal bits at the
phi-2 shape, prefill >= 1x, peak RSS <= 1.2x llama.cpp's, int4 perplexity delta no worse than Q4_0's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from rows import held_equal, measure_bandwidth, row

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LLAMA_VERSION = "0.3.36"  # llama-cpp-python, built from its sdist (it vendors llama.cpp's source)
LLAMA_CACHE = Path(os.environ.get("PHIFORGE_LLAMA_CACHE") or Path.home() / ".cache" / "phiforge" / "llama-cpp")
REPLY = "@@"  # a worker's reply lines start with this (libraries may print other lines)
VARIANTS = (("phiforge", "int8"), ("llama.cpp", "q8_0"), ("phiforge", "int4"), ("llama.cpp", "q4_0"))
PEER = {"int8": "q8_0", "int4": "q4_0"}
QUALITY_WINDOW = 256


def result(name: str, value: float, unit: str) -> None:
    print(f"RESULT {name} {value:.4g} {unit}", flush=True)


# ---- llama.cpp, built from source on first use ------------------------------------------------------------------

def llama_site() -> tuple[Path | None, str]:
    """(directory to put on sys.path for `import llama_cpp`, "") once built, else (None, why not). Builds
    llama-cpp-python from PyPI's source distribution with -march=native on the first call."""
    site = LLAMA_CACHE / f"site-{LLAMA_VERSION}"
    log = LLAMA_CACHE / f"build-{LLAMA_VERSION}.log"

    def usable() -> bool:
        return (site / "llama_cpp" / "__init__.py").exists() and any((site / "llama_cpp").rglob("libllama*"))

    if not usable():
        LLAMA_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = LLAMA_CACHE / f"site-{LLAMA_VERSION}.partial"
        print(f"building llama-cpp-python {LLAMA_VERSION} from source into {site} (tens of minutes on 2 cores; "
              f"log: {log})", flush=True)
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                                           "-DLLAMA_BUILD_SERVER=OFF",
               "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-binary", "llama-cpp-python", "--target",
               str(tmp), f"llama-cpp-python=={LLAMA_VERSION}"]
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
            return None, f"pip could not build llama-cpp-python {LLAMA_VERSION} from source: {tail[0][:200]} " \
                         f"(log: {log})"
        if site.exists():
            import shutil

            shutil.rmtree(site)
        tmp.rename(site)
    if not (site / "diskcache").exists():  # llama_cpp imports it at import time; a small pure-Python package
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        "diskcache"], check=False)
    if not usable():
        return None, f"{site} has no llama_cpp package with its libllama"
    return site, ""


# ---- the weights --------------------------------------------------------------------------------------------------

def bench_config(quick: bool, layers: int | None = None):
    import dataclasses

    from phiforge.config import preset

    cfg = preset("phi-2")
    if quick:  # phi-2's proportions (partial rotary, head_dim 80, MLP 4x), 4 layers of d 640
        cfg = dataclasses.replace(cfg, hidden_size=640, intermediate_size=2560, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=8)
    if layers:  # phi-2's width with fewer layers: a shorter check at the real matrix sizes
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    return cfg


def write_random_checkpoint(cfg, out: Path, tokenizer) -> None:
    """Random weights of `cfg` as bf16 safetensors shards of <= 2 GiB, one tensor generated at a time (the
    model never exists in memory), with config.json and the tokenizer."""
    import torch
    from safetensors.torch import save_file

    from phiforge.checkpoint import copy_tokenizer
    from phiforge.model import init_on_meta

    out.mkdir(parents=True, exist_ok=True)
    shapes = {k: tuple(v.shape) for k, v in init_on_meta(cfg).state_dict().items() if "rotary" not in k}
    gen = torch.Generator().manual_seed(0)
    limit = 2 << 30
    groups: list[list[str]] = [[]]  # names per shard, in order, <= 2 GiB of bf16 each
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):  # one shard in memory at a time
        shard = {}
        for name in names:
            shape = shapes[name]
            t = torch.ones(shape) if name.endswith("layernorm.weight") else torch.randn(shape, generator=gen) * 0.02
            shard[name] = t.to(torch.bfloat16)
        fname = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        del shard
    if len(groups) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg.to_hf(torch_dtype="bfloat16"), indent=2))
    copy_tokenizer(tokenizer, out)


def small_tokenizer():
    from phiforge.tokenizer import train_tokenizer

    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(lib.glob("*.py"))[:40]]
    return train_tokenizer(texts, 1024)


def prepare_weights(args, cfg) -> Path:
    """The random checkpoint and its q8_0 / q4_0 GGUF exports in the work directory (made once)."""
    from phiforge.serve.gguf_export import export_gguf

    tag = shape_tag(args)
    ckpt = args.workdir / f"{tag}-random"
    if not (ckpt / "config.json").exists():
        t = time.perf_counter()
        write_random_checkpoint(cfg, ckpt, small_tokenizer())
        print(f"wrote random {tag} weights (bf16) to {ckpt} in {time.perf_counter() - t:.0f}s", flush=True)
    for q in ("q8_0", "q4_0"):
        gg = args.workdir / f"{tag}-{q}.gguf"
        if not gg.exists():
            t = time.perf_counter()
            export_gguf(ckpt, gg, quant=q)
            print(f"exported {gg} in {time.perf_counter() - t:.0f}s", flush=True)
    return ckpt


def shape_tag(args) -> str:
    """The shape's name in file names and RESULT lines: phi2, quick, or phi2-L<layers>."""
    base = "quick" if args.quick else "phi2"
    return f"{base}-L{args.layers}" if args.layers else base


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of weights a llama.cpp decode step reads from a GGUF: every tensor but the embedding, plus one of its
    rows."""
    import gguf

    total = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == "token_embd.weight":
            total += int(t.n_bytes) // int(t.shape[-1])  # one row (shape is innermost-first)
        else:
            total += int(t.n_bytes)
    return total


# ---- workers: one process per variant ----------------------------------------------------------------------------

def rss(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes. VmHWM is the peak of this process's own memory since its exec:
    ru_maxrss is not, here (Linux carries the parent's RSS at fork into the child's ru_maxrss across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is


def worker_main(args) -> None:
    """A variant in its own process: load, then answer the parent's commands (one JSON line each)."""
    t0 = time.perf_counter()
    runner = (PhiforgeRunner if args.worker == "phiforge" else LlamaRunner)(args)
    reply({"ready": True, "load_s": time.perf_counter() - t0, "base_rss": runner.base_rss,
           "describe": runner.describe, "bytes_per_token": runner.bytes_per_token,
           "huge_pages": huge_page_bytes()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        t = time.perf_counter()
        out = getattr(runner, cmd["op"])(*cmd.get("args", []))
        reply({"s": time.perf_counter() - t, "out": out})
    reply({"peak_rss": rss("VmHWM")})


def reply(obj: dict) -> None:
    sys.stdout.write(REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


class PhiforgeRunner:
    def __init__(self, args) -> None:
        import torch

        from phiforge.checkpoint import load_checkpoint
        from phiforge.generate import prepare_decoding
        from phiforge.serve.quant import weight_bytes_per_token

        torch.set_num_threads(args.threads)
        self.base_rss = rss("VmRSS")  # the runtime: Python, torch, phiforge
        quant = None if args.quant == "fp32" else args.quant
        self.model = load_checkpoint(args.model, dtype=torch.float32, quant=quant, layout="decode").eval()
        self.decoder = prepare_decoding(self.model)
        self.describe = self.decoder.describe()
        self.bytes_per_token = weight_bytes_per_token(self.model)

    def generate(self, prompt: list[int], n: int) -> list[int]:
        from phiforge.generate import GenerationConfig, generate_ids

        return generate_ids(self.model, [prompt], GenerationConfig(max_new_tokens=n, temperature=0.0,
                                                                   ignore_eos=True))[0]

    def nll(self, windows: list[list[int]]) -> list[float]:
        """Summed next-token NLL (nats) and count per window, from an empty context each."""
        import torch

        out = []
        with torch.inference_mode():
            for w in windows:
                x = torch.tensor([w])
                lp = self.model(x[:, :-1]).float().log_softmax(-1)
                out.append(-float(lp.gather(-1, x[:, 1:, None]).sum()))
        return out

    def tokenize(self, text: str) -> list[int]:
        return []


def huge_page_bytes() -> int:
    """Bytes of this process's memory in transparent huge pages (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class LlamaRunner:
    """llama.cpp through llama-cpp-python's C API bindings."""

    def __init__(self, args) -> None:
        import ctypes

        import numpy as np

        sys.path.insert(0, args.llama_site)
        import llama_cpp as L

        self.L, self.np, self.ctypes = L, np, ctypes
        L.llama_backend_init()
        self.base_rss = rss("VmRSS")  # the runtime: Python, numpy, libllama
        mp = L.llama_model_default_params()
        # Weights read into the process's own memory (--no-mmap), not mapped from the file: with a mapping, the
        # AVX2 build's Q4_0 repacking (its default "extra buffer types") leaves the mapped file's clean pages
        # resident beside the repacked copy, and peak RSS (VmHWM) counted them: 3.42 GB for phi-2 Q4_0, of which
        # 1.59 GB were reclaimable file pages; read in, 1.93 GB, what the model really needs. Speed is the same
        # either way (the weights are in memory both times).
        if hasattr(L, "LLAMA_LOAD_MODE_NONE"):
            mp.load_mode = L.LLAMA_LOAD_MODE_NONE
        else:  # older bindings
            mp.use_mmap = False
        self.model = L.llama_model_load_from_file(str(args.model).encode(), mp)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {args.model}")
        cp = L.llama_context_default_params()
        cp.n_ctx = args.n_ctx
        cp.n_batch = cp.n_ubatch = max(args.prompt_len, QUALITY_WINDOW)
        cp.n_threads = cp.n_threads_batch = args.threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.describe = f"llama.cpp (llama-cpp-python {L.__version__}), {Path(args.model).name}, " \
                        f"{args.threads} threads"
        self.bytes_per_token = gguf_bytes_per_token(Path(args.model))

    def _decode(self, tokens: list[int], all_logits: bool = False) -> None:
        L = self.L
        if all_logits:
            b = L.llama_batch_init(len(tokens), 0, 1)
            for i, t in enumerate(tokens):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, 1
                b.seq_id[i][0] = 0
            b.n_tokens = len(tokens)
            rc = L.llama_decode(self.ctx, b)
            L.llama_batch_free(b)
        else:
            arr = (L.llama_token * len(tokens))(*tokens)
            rc = L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _logits(self, i: int):
        p = self.L.llama_get_logits_ith(self.ctx, i)
        return self.np.ctypeslib.as_array(p, shape=(self.n_vocab,))

    def _clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def generate(self, prompt: list[int], n: int) -> list[int]:
        self._clear()
        self._decode(prompt)
        out = [int(self._logits(-1).argmax())]
        while len(out) < n:
            self._decode([out[-1]])
            out.append(int(self._logits(-1).argmax()))
        return out

    def nll(self, windows: list[list[int]]) -> list[float]:
        np = self.np
        out = []
        for w in windows:
            self._clear()
            self._decode(w[:-1], all_logits=True)
            total = 0.0
            for i, target in enumerate(w[1:]):
                z = self._logits(i).astype(np.float64)
                m = z.max()
                total += float(m + np.log(np.exp(z - m).sum()) - z[target])
            out.append(total)
        return out

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (self.L.llama_token * (len(data) + 16))()
        n = self.L.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, False)
        return list(buf[:n])


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, kind: str, quant: str, model: Path, args, site: Path | None) -> None:
        self.kind, self.quant = kind, quant
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--quant", quant, "--model",
               str(model), "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
               "--n-ctx", str(args.prompt_len + args.new_tokens + 64)]
        if site is not None:
            cmd += ["--llama-site", str(site)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if kind == "llama.cpp":
            # Huge pages for both: phiforge asks for them on the weights it streams (kernels.empty_streamed);
            # llama.cpp has no option of its own, but glibc (2.35+) advises them on its large malloc'd blocks with
            # this tunable, which covers llama.cpp's weights read in (--no-mmap, below) and its KV cache. Each
            # worker reports how much of its memory is in huge pages (an older glibc ignores the tunable).
            tun = "glibc.malloc.hugetlb=1"
            env["GLIBC_TUNABLES"] = f"{env['GLIBC_TUNABLES']}:{tun}" if env.get("GLIBC_TUNABLES") else tun
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     stderr=subprocess.DEVNULL if kind == "llama.cpp" else None)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise RuntimeError(f"{self.kind} {self.quant} worker exited (code {self.proc.wait()})")

    def call(self, op: str, *a) -> tuple[float, object]:
        self.proc.stdin.write(json.dumps({"op": op, "args": list(a)}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return r["s"], r["out"]

    def close(self) -> int:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.flush()
        peak = self._read()["peak_rss"]
        self.proc.wait()
        return peak




# ---- speed --------------------------------------------------------------------------------------------------------

def bench_speed(args, cfg, ckpt: Path, site: Path | None) -> None:
    import random

    import torch

    torch.set_num_threads(args.threads)
    tag = shape_tag(args)
    rng = random.Random(0)
    vocab = min(cfg.vocab_size, 50000)
    short = [rng.randrange(vocab) for _ in range(16)]
    long_prompt = [rng.randrange(vocab) for _ in range(args.prompt_len)]
    variants = [(k, q) for k, q in VARIANTS if k == "phiforge" or site is not None]
    names = [f"{kind} {q}" for kind, q in variants]
    n = args.new_tokens
    t1s, tns, tps, bws = ({k: [] for k in names} for _ in range(4))
    same, peaks, infos, huge = {}, dict.fromkeys(names, 0), {}, {k: [] for k in names}
    # Each variant in a fresh process per generation, the rounds shared out among them: on a VM the read bandwidth
    # swings for seconds to minutes at a time (one run's int4 process streamed 0.55 of the bandwidth measured beside
    # it in every round, the run before's 0.68), so each side gets more than one period and process, and its fastest
    # runs count. Generations one after the other: all at once would not fit in memory at phi-2's size.
    for gen in range(args.generations):
        rounds = len(range(gen, args.rounds, args.generations))
        workers: dict[str, Worker] = {}
        for kind, q in variants:  # one at a time: each load's peak is its own
            model = ckpt if kind == "phiforge" else args.workdir / f"{tag}-{q}.gguf"
            w = Worker(kind, q, model, args, site)
            workers[f"{kind} {q}"] = w
            infos.setdefault(f"{kind} {q}", w.info)
            huge[f"{kind} {q}"].append(w.info["huge_pages"] / 1e9)
            print(f"{kind} {q} (process {gen + 1} of {args.generations}, {rounds} round{'s' * (rounds != 1)}): loaded in "
                  f"{w.info['load_s']:.1f}s; {w.info['describe']}; {w.info['huge_pages'] / 1e9:.2f} GB in huge pages",
                  flush=True)
        for w in workers.values():  # warm-up
            w.call("generate", short, 4)
            w.call("generate", long_prompt, 1)
        for _ in range(rounds):
            for name, w in workers.items():
                before = measure_bandwidth()
                t1s[name].append(w.call("generate", short, 1)[0])
                s, toks = w.call("generate", short, n)
                tns[name].append(s)
                same[name] = toks
                tps[name].append(w.call("generate", long_prompt, 1)[0])
                bws[name].append(max(before, measure_bandwidth()))
        for name, w in workers.items():
            peaks[name] = max(peaks[name], w.close())
    held = held_equal(f"the same random {tag} weights (phiforge's bf16 checkpoint, and its own q8_0 / q4_0 GGUF "
                      f"export for llama.cpp), {args.threads} threads, batch 1, greedy, {n} new tokens after a "
                      f"16-token prompt; prefill of {args.prompt_len} tokens; a warm-up each, then {args.rounds} "
                      f"round-robin rounds (fastest runs); each variant in its own process, a fresh one for each of "
                      f"{args.generations} generations of the rounds; weights read into memory on both "
                      f"sides (llama.cpp with --no-mmap, phiforge quantizing while loading), transparent huge pages "
                      f"on both where the OS gives them (GB: " + ", ".join(
                          f"{k} {' / '.join(f'{g:.2f}' for g in v)}" for k, v in huge.items()) + "), peak RSS of each")
    decode = {k: (n - 1) / max(min(tns[k]) - min(t1s[k]), 1e-9) for k in names}
    # each round's decode tok/s: its median is the typical round beside the fastest (see the docstring)
    per_round = {k: [(n - 1) / max(tn - t1, 1e-9) for t1, tn in zip(t1s[k], tns[k], strict=True)] for k in names}
    decode_median = {k: statistics.median(v) for k, v in per_round.items()}
    prefill = {k: args.prompt_len / min(tps[k]) for k in names}
    result(f"{tag}_memory_bandwidth_sum_peak", max(max(v) for v in bws.values()), "GB/s")
    for name, info in infos.items():
        key = name.replace(" ", "_").replace(".", "")
        nbytes = info["bytes_per_token"]
        fracs = [nbytes * tok_s / (bw * 1e9) for tok_s, bw in zip(per_round[name], bws[name], strict=True)]
        result(f"{tag}_decode_{key}", decode[name], "tok/s")
        result(f"{tag}_decode_{key}_median_round", decode_median[name], "tok/s")
        result(f"{tag}_prefill_{key}", prefill[name], "tok/s")
        result(f"{tag}_peak_rss_{key}", peaks[name] / 1e9, "GB")
        result(f"{tag}_runtime_rss_{key}", info["base_rss"] / 1e9, "GB")
        result(f"{tag}_decode_{key}_bw_fraction", statistics.median(fracs), "fraction")
        print(f"  {name}: {nbytes / 1e6:.0f} MB read per token; per round bandwidth (GB/s) -> fraction: "
              + ", ".join(f"{b:.0f} -> {f:.2f}" for b, f in zip(bws[name], fracs, strict=True)), flush=True)
    for q in ("int8", "int4"):
        ours, theirs = f"phiforge {q}", f"llama.cpp {PEER[q]}"
        shape = {"phi2": "phi-2 shape", "quick": "quick shape"}.get(tag, f"phi-2 width, {args.layers} layers")
        if theirs not in infos:
            row(f"batch-1 decode, {shape}, {q}", "llama.cpp (not built here)", "—", decode[ours], None, "tok/s",
                ">= 1.3x", held=held, note=f"prefill {prefill[ours]:.1f} tok/s, peak RSS {peaks[ours] / 1e9:.2f} GB")
            continue
        result(f"{tag}_decode_{q}_vs_llamacpp", decode[ours] / decode[theirs], "x")
        result(f"{tag}_decode_{q}_vs_llamacpp_median_round", decode_median[ours] / decode_median[theirs], "x")
        result(f"{tag}_prefill_{q}_vs_llamacpp", prefill[ours] / prefill[theirs], "x")
        result(f"{tag}_peak_rss_{q}_vs_llamacpp", peaks[ours] / peaks[theirs], "x")
        setting = f"{PEER[q].upper()} GGUF from phiforge's exporter, C API, greedy"
        bw = [b for k in (ours, theirs) for b in bws[k]]
        row(f"batch-1 decode, {shape}, {q}", f"llama.cpp {PEER[q].upper()}", setting, decode[ours], decode[theirs],
            "tok/s", ">= 1.3x", held=held,
            note=f"median round {decode_median[ours]:.1f} vs {decode_median[theirs]:.1f} tok/s = "
                 f"{decode_median[ours] / decode_median[theirs]:.2f}x; per round (tok/s): "
                 + ", ".join(f"{a:.1f}" for a in per_round[ours]) + " vs "
                 + ", ".join(f"{b:.1f}" for b in per_round[theirs])
                 + f"; read bandwidth beside the runs {min(bw):.0f}-{max(bw):.0f} GB/s")
        row(f"prefill {args.prompt_len} tokens, {shape}, {q}", f"llama.cpp {PEER[q].upper()}", setting,
            prefill[ours], prefill[theirs], "tok/s", ">= 1x", held=held)
        row(f"peak RSS, {shape}, {q}", f"llama.cpp {PEER[q].upper()}", setting, peaks[ours] / 1e9,
            peaks[theirs] / 1e9, "GB", "<= 1.2x", ratio=peaks[ours] / peaks[theirs], ratio_unit="x (lower is better)",
            held=held, note=f"runtime before loading: phiforge {infos[ours]['base_rss'] / 1e9:.2f} GB, "
                            f"llama.cpp {infos[theirs]['base_rss'] / 1e9:.2f} GB")
        agree = sum(a == b for a, b in zip(same[ours], same[theirs], strict=False)) / max(len(same[ours]), 1)
        print(f"  {q}: greedy tokens equal to llama.cpp's on {agree:.0%} of {n} (random weights: near-ties are "
              f"common, a difference is not an error)", flush=True)


# ---- quality --------------------------------------------------------------------------------------------------------

def train_small(args):
    """A small Phi trained briefly on the standard library's source; saved with its tokenizer; held-out text."""
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.config import ModelConfig
    from phiforge.model import Phi
    from phiforge.tokenizer import model_vocab_size, train_tokenizer

    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))[:120]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    held_text = "\n".join(texts[-6:])
    texts = texts[:-6]
    d, layers, T, B = (128, 2, 64, 8) if args.quick else (256, 4, 128, 16)
    out = args.workdir / f"small-trained-d{d}-{args.train_steps}"
    if (out / "config.json").exists():
        return out, held_text
    tok = train_tokenizer(texts, 2048)
    ids = torch.tensor([t for text in texts for t in tok.encode(text) + [tok.eos_token_id]])
    cfg = ModelConfig(vocab_size=model_vocab_size(tok), hidden_size=d, intermediate_size=4 * d,
                      num_hidden_layers=layers, num_attention_heads=d // 64, max_position_embeddings=512,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Phi(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(args.train_steps):
        starts = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
        x = torch.stack([ids[s:s + T + 1] for s in starts])
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / args.train_steps))
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"trained a small phi ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M) for {args.train_steps} "
          f"steps in {time.perf_counter() - t0:.0f}s, final train loss {loss.item():.3f}", flush=True)
    save_checkpoint(model.eval(), out, tokenizer=tok)
    return out, held_text


def bench_quality(args, site: Path | None) -> None:
    import math

    from phiforge.serve.gguf_export import export_gguf
    from phiforge.tokenizer import load_tokenizer

    if args.model is not None:
        model_dir, held_text = Path(args.model), "\n".join(
            f.read_text(encoding="utf-8", errors="replace")
            for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[-6:])
    else:
        model_dir, held_text = train_small(args)
    tok = load_tokenizer(model_dir)
    ids = tok.encode(held_text)[:args.quality_tokens + 1]
    windows = [ids[s:s + QUALITY_WINDOW + 1] for s in range(0, len(ids) - 1, QUALITY_WINDOW)]
    windows = [w for w in windows if len(w) > 1]
    count = sum(len(w) - 1 for w in windows)
    held_equal(f"the same trained model ({model_dir.name}), the same {count} held-out tokens in windows of "
               f"{QUALITY_WINDOW} from an empty context; each side's quantized perplexity against its own fp32")
    ppl = {}
    for q in ("fp32", "int8", "int4"):
        w = Worker("phiforge", q, model_dir, argparse.Namespace(**{**vars(args), "prompt_len": QUALITY_WINDOW,
                                                                  "new_tokens": 1}), None)
        ppl[f"phiforge {q}"] = math.exp(sum(w.call("nll", windows)[1]) / count)
        w.close()
    if site is not None:
        for q in ("f32", "q8_0", "q4_0"):
            gg = args.workdir / f"{model_dir.name}-{q}.gguf"
            if not gg.exists():
                export_gguf(model_dir, gg, quant=q)
            w = Worker("llama.cpp", q, gg, argparse.Namespace(**{**vars(args), "prompt_len": QUALITY_WINDOW,
                                                                "new_tokens": 1}), site)
            ppl[f"llama.cpp {q}"] = math.exp(sum(w.call("nll", windows)[1]) / count)
            if q == "f32":
                theirs = w.call("tokenize", held_text)[1]
                ours = tok.encode(held_text)
                result("quality_llamacpp_tokenizer_same_ids", float(theirs == ours), "bool")
                if theirs != ours:
                    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours),
                                                                                                   len(theirs)))
                    print(f"  tokenizers differ first at token {first} (ours {len(ours)}, llama.cpp {len(theirs)} "
                          f"tokens)", flush=True)
            w.close()
    for name, p in ppl.items():
        result(f"quality_ppl_{name.replace(' ', '_').replace('.', '')}", p, "ppl")
    for q in ("int8", "int4"):
        ours = 100 * (ppl[f"phiforge {q}"] / ppl["phiforge fp32"] - 1)
        result(f"quality_ppl_delta_phiforge_{q}", ours, "%")
        theirs = None
        if site is not None:
            theirs = 100 * (ppl[f"llama.cpp {PEER[q]}"] / ppl["llama.cpp f32"] - 1)
            result(f"quality_ppl_delta_llamacpp_{PEER[q]}", theirs, "%")
        row(f"perplexity delta vs fp32, trained small Phi, {q}", f"llama.cpp {PEER[q].upper()} vs its F32"
            if theirs is not None else "llama.cpp (not built here)", "GGUF from phiforge's exporter", ours, theirs,
            "% ppl", "<= peer's (int4)", ratio=None if theirs is None else ours - theirs,
            ratio_unit="points (lower is better)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small shape, few tokens and rounds: runs end to end")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--generations", type=int, default=None,
                    help="fresh processes per variant, one set after another, sharing the rounds (default 2)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None,
                    help="the shape's width with this many layers (e.g. 4: phi-2's matrices, a shorter run)")
    ap.add_argument("--model", default=None, help="a trained phiforge checkpoint for the quality part")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--quality-tokens", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "phiforge" / "bench-laptop",
                    help="where the random weights and GGUF files are kept between runs (phi-2: ~10 GB)")
    ap.add_argument("--no-llama", action="store_true", help="phiforge's figures alone (do not build llama.cpp)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: speed, quality")
    # worker mode (internal)
    ap.add_argument("--worker", choices=["phiforge", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--quant", help=argparse.SUPPRESS)
    ap.add_argument("--llama-site", help=argparse.SUPPRESS)
    ap.add_argument("--n-ctx", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.prompt_len is None:
            args.prompt_len = 512
        worker_main(args)
        return
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 6)
    args.generations = max(1, min(args.generations or 2, args.rounds))
    args.new_tokens = args.new_tokens or (16 if quick else 64)
    args.prompt_len = args.prompt_len or (64 if quick else 512)
    args.train_steps = args.train_steps or (40 if quick else 400)
    args.quality_tokens = args.quality_tokens or (512 if quick else 4096)
    args.workdir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    site, why = (None, "--no-llama") if args.no_llama else llama_site()
    if site is None:
        print(f"llama.cpp: not available ({why}); phiforge's figures alone", flush=True)
    cfg = bench_config(quick, args.layers)
    if "speed" not in skip:
        ckpt = prepare_weights(args, cfg)
        bench_speed(args, cfg, ckpt, site)
    if "quality" not in skip:
        bench_quality(args, site)


if __name__ == "__main__":
    main()
