"""Exact resume: a run killed with SIGKILL and resumed logs the same per-step losses as an uninterrupted run
(plain token streams; and packed fine-tuning examples with loss masks, fully and with LoRA adapters)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "def", "foo", "return", "x", "print", "hello", "world", "python", "code", "loop", "list"]

# The child trains with a short sleep after every step (via the on_step hook), so the parent can kill it at an
# arbitrary point once a checkpoint exists: mid-step, mid-log-write or mid-save, as a real crash would.
CHILD = """
import sys, time
from phiforge.train import load_train_config, train
cfg = load_train_config(sys.argv[1], sys.argv[3:])
train(cfg, resume=sys.argv[2] == "resume", on_step=lambda r: time.sleep(0.1))
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    from phiforge.data.pack import pack_corpus

    tmp = tmp_path_factory.mktemp("resume")
    rng = random.Random(0)
    src = tmp / "c.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n"
                           for _ in range(200)))
    pack_corpus([src], tmp / "tok", train_vocab=300, val_fraction=0.1, workers=1)
    cfg = tmp / "r.yaml"
    # resid dropout on: the RNG state must be restored too for the losses to match.
    cfg.write_text(f"""model: tiny
model_overrides: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2,
                  max_position_embeddings: 64, resid_pdrop: 0.1}}
data: {tmp / 'tok'}
seq_len: 32
micro_batch: 4
grad_accum: 2
max_steps: 12
warmup: 3
lr: 3.0e-3
min_lr: 3.0e-4
eval_every: 5
eval_batches: 2
save_every: 3
keep_last: 2
threads: 1
""")
    return tmp, cfg


def _losses(out):
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    train = {r["step"]: r["loss"] for r in recs if r["type"] == "train"}
    evals = {r["step"]: r["val_loss"] for r in recs if r["type"] == "eval"}
    return [train[s] for s in sorted(train)], sorted(train), evals


def _run(cfg, out, mode, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PHIFORGE_PROGRESS": "0"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(cfg), mode, f"out={out}", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_then_resume_is_bit_exact(recipe):
    tmp, cfg = recipe
    _kill_resume_and_compare(tmp, cfg, "model.safetensors")


@pytest.fixture(scope="module")
def ft_recipe(tmp_path_factory, recipe):
    """Prompt/completion examples tokenized with a loss mask, and a base checkpoint to fine-tune (for LoRA)."""
    from phiforge.data.pack import pack_corpus
    from phiforge.train import load_train_config, train

    tmp, cfg = recipe
    ft = tmp_path_factory.mktemp("resume-ft")
    base = train(load_train_config(cfg, [f"out={ft / 'base'}", "max_steps=2", "save_every=0", "eval_every=0"]))
    rng = random.Random(1)
    src = ft / "ex.jsonl"
    src.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))),
                                       "completion": " " + " ".join(rng.choice(WORDS) for _ in range(
                                           rng.randint(1, 6)))}) + "\n" for _ in range(300)))
    pack_corpus([src], ft / "tok", tokenizer=base.checkpoint, records="completion", seq_len=32, val_fraction=0.1,
                workers=1)
    return ft, cfg, base.checkpoint


@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.slow)],  # peft's import: ~60 s
                         ids=["masked", "masked-lora"])
def test_sigkill_then_resume_is_bit_exact_with_masks(ft_recipe, lora):
    ft, cfg, base = ft_recipe
    out = ft / ("lora" if lora else "full")
    out.mkdir()
    extra = [f"data={ft / 'tok'}", f"model={base}", "model_overrides={}"] + (["lora_rank=4", "lr=3e-2"] if lora else [])
    (out / "r.yaml").write_text(cfg.read_text())
    _kill_resume_and_compare(out, out / "r.yaml", "adapter_model.safetensors" if lora else "model.safetensors",
                             extra)


def _kill_resume_and_compare(tmp, cfg, weights, extra=()):
    ref = _run(cfg, tmp / "ref", "fresh", extra)  # uninterrupted; runs alongside the one we kill
    victim = _run(cfg, tmp / "killed", "fresh", extra)
    deadline = time.time() + 120
    ckpt = tmp / "killed" / "checkpoints" / "step-000006"
    while not ckpt.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, f"the run ended before it could be killed: {victim.communicate()[1][-2000:]}"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_steps = _losses(tmp / "killed")[1]
    assert 6 <= max(killed_steps) <= 12  # (< 12 unless the machine stalled the parent for 0.6 s)
    resumed = _run(cfg, tmp / "killed", "resume", extra)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err.decode()[-3000:]
    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err.decode()[-3000:]

    ref_losses, ref_steps, ref_evals = _losses(tmp / "ref")
    res_losses, res_steps, res_evals = _losses(tmp / "killed")
    assert ref_steps == res_steps == list(range(1, 13))
    assert res_losses == ref_losses  # exactly equal, not approximately
    assert res_evals == ref_evals
    assert any(json.loads(x)["type"] == "resume" for x in (tmp / "killed" / "log.jsonl").read_text().splitlines())
    # The final weights are identical too.
    a = (tmp / "ref" / "checkpoints" / "step-000012" / weights).read_bytes()
    b = (tmp / "killed" / "checkpoints" / "step-000012" / weights).read_bytes()
    assert a == b
