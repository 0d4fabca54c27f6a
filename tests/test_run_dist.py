"""`phiforge run` at cluster scale, on CPU processes: under `torchrun --nproc_per_node 2` (gloo) the run makes the
same data stages (byte for byte), the same losses (within DDP's tolerance) and the same report as one process;
a restarted job reuses what is finished; a rank failing mid-train, or waiting too long, ends the whole job with a
message naming the stage; curation on Ray inside the run matches the local executor; the textbooks stage talks
to a served teacher with the configured concurrency; `--dry-run` plans the shipped recipes."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import JSONServer

from phiforge.errors import ConfigError, PhiforgeError

REPO = Path(__file__).resolve().parents[1]
DATA_STAGES = ("corpus", "curated", "synth", "textbooks", "exercises", "tokens", "ft-tokens")
# A micro run: every stage, a 38k-parameter model, a few steps. Batches are global (run_dist.share_batch):
# 2 processes take grad_accum 2 / 2 = 1 micro-step of 4 sequences each, as one process takes 2 of 4.
MICRO = {
    "out": "run",
    "corpus": {"max_files": 8, "max_chars": 4000},
    "curate": {"steps": [{"type": "python"}, {"type": "exact_dedup"},
                         {"type": "decontaminate", "ngram": 13, "benchmarks": ["humaneval"]}]},
    "synth": {"n": 80},
    "textbooks": {"n": 0},
    "tokenizer": {"vocab_size": 320, "val_fraction": 0.2},
    "train": {"model": "tiny", "model_overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                   "num_attention_heads": 2, "max_position_embeddings": 64},
              "seq_len": 32, "micro_batch": 4, "grad_accum": 2, "max_steps": 4, "warmup": 1, "eval_every": 2,
              "eval_batches": 2, "save_every": 4, "threads": 1, "dtype": "fp32", "lr": 3.0e-3},
    "finetune": {"seq_len": 64, "micro_batch": 2, "grad_accum": 2, "max_steps": 2, "warmup": 1, "eval_every": 2,
                 "eval_batches": 2, "save_every": 2, "threads": 1, "dtype": "fp32"},
    "eval": {"heldout_exercises": 2, "humaneval_limit": 1, "max_new_tokens": 8, "batch_size": 4, "bpb_stdlib_files": 2,
             "mbpp_limit": 1, "samples": ["def add(a, b):\n"]},
}
TIMEOUT = 300  # seconds for one job: a hang is a failure, never a stuck test run


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PHIFORGE_TEST_FAULT"}
    env.update({"OMP_NUM_THREADS": "1", "PHIFORGE_PROGRESS": "0", **extra})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _phiforge(cwd: Path, cfg: Path, *args: str, nproc: int = 1, **env: str) -> subprocess.CompletedProcess:
    """`phiforge run --config cfg` in `cwd` (the run directory is cwd/run), alone or under torchrun."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    cmd = [*launch, "-m", "phiforge", "run", "--config", str(cfg), *args]
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)


def _write_config(path: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(MICRO))
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The micro run in one process and under torchrun with 2 processes (each in its own directory, same
    relative paths, so files that name paths are comparable)."""
    tmp = tmp_path_factory.mktemp("dist")
    cfg = _write_config(tmp / "micro.yaml")
    single = _phiforge(tmp / "single", cfg)
    assert single.returncode == 0, single.stderr[-3000:]
    two = _phiforge(tmp / "two", cfg, nproc=2)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    return tmp, cfg, tmp / "single" / "run", tmp / "two" / "run", two


def _timeless(obj):
    """JSON without what measures time (seconds, finished timestamps)."""
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if k not in ("seconds", "finished", "_total_seconds")}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def _files(d: Path) -> dict[str, Path]:
    return {str(p.relative_to(d)): p for p in sorted(d.rglob("*")) if p.is_file()}


def _losses(run: Path, stage: str) -> tuple[list[float], list[float]]:
    recs = [json.loads(x) for x in (run / stage / "log.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in recs if r["type"] == "train"], [r["val_loss"] for r in recs if r["type"] == "eval"]


def _close(a, b, path: str = "") -> None:
    """Nested JSON values equal, floats within DDP's tolerance (the all-reduce sums in another order)."""
    if isinstance(a, float) or isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (path, a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


# Report lines that measure time, not results: the run's stage time, a stats table's seconds row (and the
# "Stage times" table, skipped whole below).
_TIMING = re.compile(r"stage time \d+s|^\| seconds \|")


def _report_lines(run: Path) -> list[str]:
    out, in_times = [], False
    for line in (run / "report.md").read_text().splitlines():
        if line.startswith("#"):
            in_times = line.strip() == "### Stage times"
        if (in_times and line.startswith("|")) or _TIMING.search(line):
            continue
        out.append(_own_dirs(line, run))
    return out


def _own_dirs(text: str, run: Path) -> str:
    """text with the run's own directories named alike: checkpoint paths are absolute, and a benchmark found
    nowhere names where it looked (the run's working directory among them)"""
    return text.replace(str(run.resolve()), "RUN_DIR").replace(str(run.parent.resolve()), "CWD")


def test_two_processes_make_the_same_run_as_one(runs):
    tmp, _, single, two, proc = runs
    # the data stages ran once (rank 0) and are byte-identical; JSON files equal but for their timings
    for stage in DATA_STAGES:
        a, b = _files(single / stage), _files(two / stage)
        assert a.keys() == b.keys(), stage
        for name, pa in a.items():
            if name.endswith(".json"):
                assert _timeless(json.loads(pa.read_text())) == _timeless(json.loads(b[name].read_text())), name
            else:
                assert pa.read_bytes() == b[name].read_bytes(), f"{stage}/{name}"
    # every rank trained: the same global batches, so the same losses within DDP's tolerance
    for stage in ("train", "finetune"):
        (la, va), (lb, vb) = _losses(single, stage), _losses(two, stage)
        assert len(la) == len(lb) > 0 and len(va) == len(vb) > 0
        _close(la, lb, stage)
        _close(va, vb, stage)
        start = json.loads((two / stage / "log.jsonl").read_text().splitlines()[0])
        assert start["world_size"] == 2
    # evaluation and the report: once, the same results
    for stage in ("eval-base", "eval"):
        _close(*(_timeless(json.loads(_own_dirs((run / stage / "results.json").read_text(), run)))
                 for run in (single, two)), stage)
    assert _report_lines(single) == _report_lines(two)
    # rank 0 printed the run (each stage line once); each rank has its log
    out = proc.stdout + proc.stderr
    assert out.count("[1/12] corpus: collect") == 1 and "train: pretrain the base model" in out
    assert "(on 2 processes)" in out and "phiforge run finished" in out
    r0, r1 = ((two / "logs" / f"rank-{k}.log").read_text() for k in (0, 1))
    assert "[1/12] corpus" in r0 and "corpus: collect" not in r1
    assert "rank 1: waiting for rank 0 to finish the stages before 'train'" in r1
    assert re.search(r"train: step \d+ loss", r1) and "[7/12] train: done" in r1


def test_a_restarted_job_reuses_every_finished_stage(runs):
    tmp, cfg, _, two, _ = runs
    proc = _phiforge(tmp / "two", cfg, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reused = re.findall(r"\] ([\w-]+): up to date", proc.stdout)
    assert reused == ["corpus", "curated", "synth", "textbooks", "exercises", "tokens", "train", "ft-tokens",
                      "finetune", "eval-base", "eval"]
    assert "[12/12] report: write the report" in proc.stdout


def _data_copy(two: Path, dest: Path) -> None:
    """A run directory holding the finished data stages (so a job reaches training at once)."""
    for stage in ("corpus", "curated", "synth", "textbooks", "exercises", "tokens"):
        shutil.copytree(two / stage, dest / "run" / stage)


def test_a_rank_failing_mid_train_stops_the_whole_run(runs):
    tmp, cfg, _, two, _ = runs
    _data_copy(two, tmp / "fail")
    t0 = time.monotonic()
    proc = _phiforge(tmp / "fail", cfg, nproc=2, PHIFORGE_TEST_FAULT="train:1:2")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "phiforge: error: stage 'train' failed on rank 1 of 2: injected fault at step 2" in out
    assert "rank 0 stopped too" in out or "SIGTERM" in out  # rank 0 left its collective: no hang
    assert time.monotonic() - t0 < TIMEOUT
    run = tmp / "fail" / "run"
    assert (run / "tokens" / ".stage.json").exists() and not (run / "train" / ".stage.json").exists()
    assert "stage 'train' failed on rank 1 of 2" in (run / "logs" / "rank-1.log").read_text()


def test_a_rank_that_waits_too_long_ends_the_run_naming_the_wait(runs):
    tmp, cfg, _, _, _ = runs
    slow = _write_config(tmp / "slow.yaml", dist={"wait_timeout": 1.0, "poll": 0.1})
    proc = _phiforge(tmp / "slow", slow, nproc=2)  # rank 0's data stages take longer than a second
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert re.search(r"rank 1 waited \d+s for rank 0 to finish the stages before 'train' .*longer than dist: "
                     r"wait_timeout \(1s\)", out)
    # train never completed (rank 0 may have finished its data stages and begun it just as the wait ran out: it is
    # stopped then, its folder perhaps made; the full suite on 2 cores hit that race)
    assert not (tmp / "slow" / "run" / "train" / ".stage.json").exists()


def test_the_global_batch_is_shared_by_the_ranks():
    from phiforge.run_dist import share_batch
    from phiforge.train.config import TrainConfig

    cfg = TrainConfig(micro_batch=8, grad_accum=16, max_steps=10, eval_batches=10)
    assert share_batch(cfg, 1) is cfg
    shared = share_batch(cfg, 8)  # the per-GPU micro-batch stays; micro-steps are divided
    assert (shared.micro_batch, shared.grad_accum, shared.eval_batches) == (8, 2, 2)
    odd = share_batch(TrainConfig(micro_batch=6, grad_accum=1, max_steps=10), 3)
    assert (odd.micro_batch, odd.grad_accum) == (2, 1)
    with pytest.raises(ConfigError, match="cannot be shared by 4 processes"):
        share_batch(TrainConfig(micro_batch=6, grad_accum=3, max_steps=10), 4)


def test_a_training_stage_left_to_rank_0_is_refused_not_left_hanging(monkeypatch):
    """A Stage that trains must be every_rank: on rank 0 alone its DDP collectives would wait for ranks that
    never come."""
    from phiforge import run_dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setitem(run_dist._running, "stage", "ablate/seed-1/raw-pretrain")
    monkeypatch.setitem(run_dist._running, "every_rank", False)
    with pytest.raises(PhiforgeError, match=r"stage 'ablate/seed-1/raw-pretrain' trains, but plan\(\) runs it on "
                                            r"rank 0 alone; mark its Stage every_rank=True"):
        run_dist.step_hook("raw-pretrain")
    monkeypatch.setitem(run_dist._running, "every_rank", True)
    assert callable(run_dist.step_hook("train"))  # ranks > 0 log their steps; rank 0 has its progress bar


# ---- Ray and a served teacher inside the run ------------------------------------------------------------------


def _stages(cfg, names):
    from phiforge.run import plan

    return [s for s in plan(cfg) if s.name in names]


def test_curation_on_ray_inside_the_run_matches_the_local_executor(tmp_path, monkeypatch):
    """~30 s on a busy 2-core machine, most of it a local Ray cluster starting inside the run's curate stage."""
    pytest.importorskip("ray")
    from phiforge.run import Runner, load_run_config

    outs = {}
    for executor in ("local", "ray"):
        monkeypatch.chdir((tmp_path / executor).mkdir() or tmp_path / executor)  # records name relative paths
        over = {**MICRO, "out": "run", "corpus": {"max_files": 24, "max_chars": 6000},
                "curate": {**MICRO["curate"], "executor": executor, "workers": 2,
                           "steps": [*MICRO["curate"]["steps"][:2],
                                     {"type": "minhash", "ngram": 5, "bands": 14, "rows": 8, "threshold": 0.7}]}}
        cfg = load_run_config(overrides=over)
        Runner(Path(cfg.out), log=lambda m: None).run(_stages(cfg, ("corpus", "curated")))
        outs[executor] = tmp_path / executor / "run" / "curated"
    import ray

    assert not ray.is_initialized()  # the stage stopped the cluster it started
    local, on_ray = _files(outs["local"]), _files(outs["ray"])
    kept = [n for n in local if not n.startswith(".work") and n != ".stage.json"]
    assert kept and set(kept) <= set(on_ray)
    for name in kept:
        assert local[name].read_bytes() == on_ray[name].read_bytes(), name


class _Teacher(JSONServer):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that writes prose and counts requests in flight."""

    TEXT = ("the list holds values and a loop visits each one before the function returns a result while "
            "students read how python code uses names for data so every step of the program stays clear and "
            "simple tests check that answers match what the lesson predicts")

    def __init__(self) -> None:
        self.in_flight = self.peak = self.requests = 0
        self.lock = threading.Lock()
        self.start()

    def handle(self, h, body: dict) -> None:
        with self.lock:
            self.in_flight += 1
            self.requests += 1
            self.peak = max(self.peak, self.in_flight)
        time.sleep(0.05)  # long enough for concurrent requests to overlap
        text = self.answer(body["messages"][-1]["content"])
        with self.lock:
            self.in_flight -= 1
        payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": text}}],
                              "usage": {"prompt_tokens": 10, "completion_tokens": 60, "total_tokens": 70}}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def answer(self, prompt: str) -> str:
        rng = random.Random(prompt)
        words = self.TEXT.split()
        return " ".join(" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(6))



def test_textbooks_from_a_served_teacher_inside_the_run(tmp_path):
    from phiforge.data.synth.pipeline import read_samples
    from phiforge.run import Runner, load_run_config

    teacher = _Teacher()
    try:
        over = {"out": str(tmp_path / "run"),
                "textbooks": {"n": 12, "teacher": f"openai:teacher@{teacher.url}", "batch_size": 12,
                              "teacher_options": {"concurrency": 4, "timeout": 30}, "cache": False,
                              "sampling": {"max_new_tokens": 64}}}
        cfg = load_run_config(overrides=over)
        summaries = Runner(Path(cfg.out), log=lambda m: None).run(_stages(cfg, ("textbooks",)))
    finally:
        teacher.close()
    samples = list(read_samples(tmp_path / "run" / "textbooks"))
    assert len(samples) == 12 and all(s["text"] for s in samples)
    assert summaries["textbooks"]["seconds"] >= 0
    assert 1 < teacher.peak <= 4  # requests overlapped, never more than the configured concurrency


# ---- --dry-run --------------------------------------------------------------------------------------------------


def _dry(capsys, *args: str) -> tuple[int, str, str]:
    from phiforge.cli import main

    code = main(["run", *args, "--dry-run"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_dry_run_of_the_phi_1_recipe(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the run directory stays absent
    code, out, _ = _dry(capsys, "--config", str(REPO / "configs" / "recipes" / "phi-1.yaml"),
                        "--hardware", "gpus=8,gpu=h100,mfu=0.4")
    assert code == 0
    names = re.findall(r"^\s*\d+\. ([\w-]+) — ", out, re.M)
    assert names[:7] == ["corpus", "curated", "synth", "textbooks", "exercises", "tokens", "train"]
    assert names[-1] == "report"
    assert "hf:bigcode/the-stack-dedup data_dir=data/python split=train (streamed), field 'content'" in out
    # pretraining: 24,000 steps x 1,024 x 2,048 = 50.3B tokens; 6·N·D with N = 1.31B
    assert "tokens  50.3B = 24,000 steps x 1,024 sequences x 2,048" in out
    assert "6·N·D = 3.97e+20 (N = 1.31B parameters without the token embedding)" in out
    assert re.search(r"time    \d+(\.\d+)? h on 8 x h100 at MFU 0.4", out)
    assert "tokens  3.15B = 6,000 steps x 256 sequences x 2,048" in out  # the exercise fine-tune
    assert "teacher openai:teacher@http://localhost:8000/v1, 64 requests in flight" in out
    assert "[every rank; runs]" in out and "[rank 0; runs]" in out
    assert "ok    train: global batch 1024 sequences = 8 GPUs x micro_batch 8 x grad_accum 16" in out
    assert "?     corpus the-stack-dedup: hf:bigcode/the-stack-dedup is a hub dataset: not checked offline" in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_of_the_phi_1_5_recipe(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = _dry(capsys, "--config", str(REPO / "configs" / "recipes" / "phi-1.5.yaml"))
    assert code == 0
    assert "tokens  150B = 35,763 steps x 2,048 sequences x 2,048" in out
    assert "6·N·D = 1.18e+21" in out and "on 32 x a100 at MFU 0.4" in out
    assert "tokens  <= 20.5B generated (20,000,000 samples x max_new_tokens 1,024)" in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_checks_the_inputs(capsys, tmp_path, monkeypatch):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({
        "out": str(tmp_path / "run"),
        "corpus": {"sources": [{"path": str(tmp_path / "nothing" / "*.parquet"), "limit": 1000}]},
        "textbooks": {"n": 10, "teacher": "openai:gpt-x@https://api.example.com/v1"},
        "train": {"model": "tiny", "model_overrides": {"hidden_size": 30, "num_attention_heads": 4}},
        "hardware": {"gpus": 3, "gpu": "no-such-gpu"}}))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, out, err = _dry(capsys, "--config", str(cfg))
    assert code == 2 and err.startswith("phiforge: error: dry run: ") and err.count("\n") == 1
    assert "FAIL  corpus nothing: " in out and "no file matches" in out
    assert "FAIL  textbooks: teacher openai:gpt-x@https://api.example.com/v1: endpoint https://api.example.com/v1 " \
           "needs an API key; set $OPENAI_API_KEY" in out
    assert "FAIL  train: model tiny: hidden_size 30 is not divisible by num_attention_heads 4" in out
    assert "FAIL  hardware: 3 x no-such-gpu: not in the peak table" in out
    assert "FAIL  train: the global batch micro_batch 16 x grad_accum 1 cannot be shared by 3" in out
    assert not (tmp_path / "run").exists()


def test_dry_run_on_this_cpu_by_default(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = _dry(capsys, "--fast")
    assert code == 0 and "hardware: CPU" in out and "the Python standard library at" in out
    assert re.search(r"train — .*\n(.*\n){2,4}\s+tokens  \d", out)
    assert not (tmp_path / "runs").exists()
