"""Corruption sweep: damage each file of a real (tiny) run directory in turn, run the command that reads it, and
print one row per case: file, corruption, exit code, message. The bar: no traceback, no hang, ever.

    python tests/corruption_sweep.py                 # every file x every corruption (~10 minutes on 2 cores)
    python tests/corruption_sweep.py --quick         # two corruptions per file
    python tests/corruption_sweep.py --keep DIR      # build the run in DIR and keep it

The run is made by the CLI itself, as a user would: a small JSONL corpus -> `curate` -> `tokenize` (BPE trained
on it) -> `train` (a 1-layer model, 4 steps, checkpoints every 2, keep_last 1) and a procedural `synth`. Each case
copies the part of the run its command reads, damages one file there and runs `python -m phiforge ...` in a
subprocess with a timeout. The last line is `RESULT corruption_tracebacks N count` (and hangs): both must be 0.
A case passes when the command exits 0 (the damage was skipped, said, or repaired) or with one
`phiforge: error:` line; a traceback or a timeout fails it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 120  # seconds a case may take: a run that needs longer counts as a hang

CURATE_YAML = "steps:\n  - type: python\n  - type: exact_dedup\n"
SYNTH_YAML = "n: 12\nseed: 0\nmix: {math_problems: 1.0}\nprocedural_batch: 8\n"
TRAIN_YAML = """model: tiny
model_overrides: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
                  max_position_embeddings: 64}
seq_len: 32
micro_batch: 2
max_steps: 4
warmup: 1
eval_every: 0
eval_batches: 1
save_every: 2
keep_last: 1
threads: 1
"""


def phiforge(*args: str, cwd: Path, timeout: float = TIMEOUT) -> tuple[int | None, str]:
    """(exit code or None on timeout, stderr) of `python -m phiforge ARGS` in `cwd`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run([sys.executable, "-m", "phiforge", "--quiet", *args], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, err
    return p.returncode, p.stderr


def corpus_docs(n: int = 240) -> list[str]:
    """Small Python functions, distinct enough to survive dedup and parse under the python filter."""
    rng = random.Random(0)
    words = ["total", "count", "value", "items", "index", "result", "name", "data", "size", "left", "right"]
    docs = []
    for i in range(n):
        a, b = rng.sample(words, 2)
        docs.append(f'def f{i}({a}, {b}):\n    """Combine {a} and {b} ({i})."""\n    {a} = {a} + {b} * {i}\n'
                    f"    return {a}\n")
    return docs


def build_run(root: Path) -> Path:
    """The tiny run directory, made with the CLI; returns it."""
    run = root / "run"
    (run / "corpus").mkdir(parents=True)
    with open(run / "corpus" / "code.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(corpus_docs()):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    for name, text in (("curate.yaml", CURATE_YAML), ("synth.yaml", SYNTH_YAML), ("train.yaml", TRAIN_YAML)):
        (root / name).write_text(text)
    steps = [
        ("curate", "--config", str(root / "curate.yaml"), "--in", "corpus/code.jsonl", "--out", "curated"),
        ("tokenize", "curated/code.jsonl", "--train-tokenizer", "300", "--out", "tokens", "--val-fraction", "0.1",
         "--workers", "1"),
        ("train", "--config", str(root / "train.yaml"), "--set", "data=tokens", "--set", "out=train"),
        ("synth", "--config", str(root / "synth.yaml"), "--out", "synth"),
    ]
    for args in steps:
        code, err = phiforge(*args, cwd=run, timeout=600)
        if code != 0:
            raise SystemExit(f"building the run: phiforge {' '.join(args)} failed ({code}):\n{err}")
    return run


# ---- corruptions ----------------------------------------------------------------------------------------------
def truncate_half(b: bytes) -> bytes:
    return b[: len(b) // 2]


def drop_last_byte(b: bytes) -> bytes:
    return b[:-1]


def garbage(b: bytes) -> bytes:
    return random.Random(len(b)).randbytes(len(b))


def empty(b: bytes) -> bytes:
    return b""


def not_utf8(b: bytes) -> bytes:
    """A latin-1 byte in the middle of a text line."""
    cut = b.find(b"\n", len(b) // 2)
    cut = len(b) // 2 if cut < 0 else cut
    return b[:cut] + b" caf\xe9" + b[cut:]


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {"truncate-half": truncate_half, "drop-last-byte":
                                                    drop_last_byte, "garbage": garbage, "empty": empty,
                                                    "not-utf8": not_utf8}
QUICK = ("truncate-half", "garbage")
TEXT_SUFFIXES = (".jsonl", ".json", ".yaml", ".txt")


# ---- which command reads which file ---------------------------------------------------------------------------
@dataclass
class Consumer:
    """The part of the run a command reads (copied for each case) and the command, run inside the copy."""

    copy: tuple[str, ...]
    args: Callable[[Path], tuple[str, ...]]


def consumers(root: Path) -> dict[str, Consumer]:
    """Run-relative file globs -> the command that reads them."""
    step = "train/checkpoints/step-000004"
    curate = Consumer(("corpus",), lambda d: ("curate", "--config", str(root / "curate.yaml"), "--in",
                                              "corpus/code.jsonl", "--out", "curated"))
    curate_resume = Consumer(("corpus", "curated"), curate.args)
    tokenize = Consumer(("curated", "tokens"), lambda d: ("tokenize", "curated/code.jsonl", "--tokenizer",
                                                          "tokens/tokenizer", "--out", "tokens2", "--workers", "1"))
    train = Consumer(("tokens",), lambda d: ("train", "--config", str(root / "train.yaml"), "--set", "data=tokens",
                                             "--set", "out=train2", "--set", "max_steps=1"))
    resume = Consumer(("tokens", "train"), lambda d: ("train", "--config", str(root / "train.yaml"), "--set",
                                                      "data=tokens", "--set", "out=train", "--set", "max_steps=6",
                                                      "--resume"))
    generate = Consumer((step,), lambda d: ("generate", "--model", step, "def f", "--max-new-tokens", "4"))
    synth = Consumer(("synth",), lambda d: ("synth", "--config", str(root / "synth.yaml"), "--out", "synth",
                                            "--n", "20"))
    return {
        "corpus/*.jsonl": curate,
        "curated/.work/*.json": curate_resume,
        "curated/.work/stage-*/*": curate_resume,
        "curated/*.jsonl": tokenize,
        "tokens/manifest.json": train,
        "tokens/*.bin": train,
        "tokens/tokenizer/*": tokenize,
        f"{step}/trainer_state.pt": resume,
        f"{step}/train_config.yaml": resume,
        "train/log.jsonl": resume,
        f"{step}/*.json": generate,
        f"{step}/*.safetensors": generate,
        "synth/*.jsonl": synth,
        "synth/stats.json": synth,
    }


@dataclass
class Case:
    file: str
    corruption: str
    code: int | None
    message: str

    @property
    def traceback(self) -> bool:
        return self.message.startswith("Traceback")

    @property
    def hang(self) -> bool:
        return self.code is None


def first_line(code: int | None, err: str) -> str:
    """What the case said: its traceback's last line, its error line, or its first skip/notice line."""
    lines = [x for x in err.splitlines() if x.strip()]
    if "Traceback (most recent call last)" in err:
        return "Traceback: " + (lines[-1] if lines else "")
    errors = [x for x in lines if x.startswith("phiforge: error:")]
    if errors:
        return errors[0]
    if code is None:
        return "TIMEOUT"
    said = [x for x in lines if x.startswith("phiforge")]
    return said[0] if said else "(ok, nothing said)"


def sweep(run: Path, root: Path, names: tuple[str, ...]) -> list[Case]:
    cases = []
    for pattern, consumer in consumers(root).items():
        files = sorted(p for p in run.glob(pattern) if p.is_file())
        for f in files:
            rel = f.relative_to(run).as_posix()
            for name in names:
                if name == "not-utf8" and not f.name.endswith(TEXT_SUFFIXES):
                    continue
                with tempfile.TemporaryDirectory(dir=root) as tmp:
                    work = Path(tmp)
                    for part in consumer.copy:
                        (work / part).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copytree(run / part, work / part, symlinks=True)
                    target = work / rel
                    target.write_bytes(CORRUPTIONS[name](target.read_bytes()))
                    code, err = phiforge(*consumer.args(work), cwd=work)
                case = Case(rel, name, code, first_line(code, err))
                cases.append(case)
                print(f"{rel:<48} {name:<15} {str(code):>4}  {case.message[:150]}", flush=True)
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--keep", help="build the run in this directory and keep it")
    args = ap.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="phiforge-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        run = build_run(root)
        print(f"{'file':<48} {'corruption':<15} {'exit':>4}  message")
        cases = sweep(run, root, QUICK if args.quick else tuple(CORRUPTIONS))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    tracebacks = sum(c.traceback for c in cases)
    hangs = sum(c.hang for c in cases)
    print(f"{len(cases)} cases: {tracebacks} traceback(s), {hangs} hang(s)")
    print(f"RESULT corruption_tracebacks {tracebacks} count")
    print(f"RESULT corruption_hangs {hangs} count")
    return 1 if tracebacks or hangs else 0


if __name__ == "__main__":
    sys.exit(main())
