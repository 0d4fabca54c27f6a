"""DDP and FSDP2 with 2 CPU processes (gloo, launched by torchrun) match single-process training on the same
global batch, step for step; the FSDP checkpoint (full state gathered on rank 0) loads, matches, and resumes.
The same holds for packed fine-tuning examples, whose ranks hold different numbers of completion tokens."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "def", "foo", "return", "x", "print", "hello", "world", "python", "code", "loop", "list"]
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from phiforge.data.pack import pack_corpus

    tmp = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    src = tmp / "c.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n"
                           for _ in range(200)))
    pack_corpus([src], tmp / "tok", train_vocab=300, val_fraction=0.1, workers=1)
    cfg = tmp / "d.yaml"
    cfg.write_text(f"""model: tiny
model_overrides: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2,
                  max_position_embeddings: 64}}
data: {tmp / 'tok'}
seq_len: 32
grad_accum: 2
max_steps: {STEPS}
warmup: 1
schedule: constant
lr: 3.0e-3
eval_every: 2
eval_batches: 2
save_every: 0
threads: 1
dtype: fp32
""")
    return tmp, cfg


def _records(out):
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    return ([r["loss"] for r in recs if r["type"] == "train"],
            [r["val_loss"] for r in recs if r["type"] == "eval"])


def _torchrun(cfg, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PHIFORGE_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "phiforge", "train", "--config", str(cfg), "--set", f"out={out}", "--set", "micro_batch=2", *extra]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-4000:]


@pytest.fixture(scope="module")
def single(setup):
    from phiforge.train import load_train_config, train

    tmp, cfg = setup
    # One process with micro_batch 4 = two processes with micro_batch 2 (the same global batch of 8 sequences).
    res = train(load_train_config(cfg, [f"out={tmp / 'single'}", "micro_batch=4"]))
    return _records(res.log_path.parent), res.checkpoint


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_training_matches_single_process(setup, single, mode):
    import torch

    from phiforge.checkpoint import load_checkpoint

    tmp, cfg = setup
    out = tmp / mode
    extra = ["--fsdp"] if mode == "fsdp" else []
    if mode == "fsdp":  # FSDP also stops after 2 steps and resumes from the gathered full checkpoint
        _torchrun(cfg, out, "--set", "max_steps=2", *extra)
        extra.append("--resume")
    _torchrun(cfg, out, *extra)
    (ref_loss, ref_val), ref_ckpt = single
    loss, val = _records(out)
    assert len(loss) == STEPS and len(val) == 2
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(val), torch.tensor(ref_val), rtol=1e-5, atol=1e-6)
    # The checkpoint written by rank 0 (FSDP: full state gathered from the shards) has the same weights.
    ours = load_checkpoint(out / "checkpoints" / f"step-{STEPS:06d}").state_dict()
    ref = load_checkpoint(ref_ckpt).state_dict()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5)
    state = torch.load(out / "checkpoints" / f"step-{STEPS:06d}" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["fsdp"] == (mode == "fsdp")


@pytest.fixture(scope="module")
def ft_setup(setup):
    """Prompt/completion examples (loss mask, packed rows) for the same tiny recipe, and the single-process run."""
    from phiforge.data.pack import pack_corpus
    from phiforge.train import load_train_config, train

    tmp, cfg = setup
    rng = random.Random(1)
    src = tmp / "ex.jsonl"
    src.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))),
                                       "completion": " " + " ".join(rng.choice(WORDS) for _ in range(
                                           rng.randint(1, 6)))}) + "\n" for _ in range(300)))
    pack_corpus([src], tmp / "ex", train_vocab=300, records="completion", seq_len=32, val_fraction=0.1, workers=1)
    res = train(load_train_config(cfg, [f"out={tmp / 'ft-single'}", "micro_batch=4", f"data={tmp / 'ex'}"]))
    return tmp, cfg, _records(res.log_path.parent), res.checkpoint


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_fine_tuning_with_masks_matches_single_process(ft_setup, mode):
    import torch

    from phiforge.checkpoint import load_checkpoint
    from phiforge.train.data import ExampleLoader

    tmp, cfg, (ref_loss, ref_val), ref_ckpt = ft_setup
    # The two ranks' micro-batches hold different numbers of completion tokens: a per-rank mean would be off.
    ranks = [ExampleLoader(tmp / "ex", "train", 32, 2, seed=0, rank=r, world_size=2).next_batch() for r in (0, 1)]
    assert int(ranks[0].loss_mask.sum()) != int(ranks[1].loss_mask.sum())
    out = tmp / f"ft-{mode}"
    _torchrun(cfg, out, "--set", f"data={tmp / 'ex'}", *(["--fsdp"] if mode == "fsdp" else []))
    loss, val = _records(out)
    assert len(loss) == STEPS and len(val) == 2
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(val), torch.tensor(ref_val), rtol=1e-5, atol=1e-6)
    ours = load_checkpoint(out / "checkpoints" / f"step-{STEPS:06d}").state_dict()
    ref = load_checkpoint(ref_ckpt).state_dict()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # peft's import in every process: ~40 s
def test_two_process_lora_under_fsdp_matches_single_process_and_resumes(ft_setup):
    import torch
    from safetensors.torch import load_file

    from phiforge.train import load_train_config, train

    tmp, cfg, _, base = ft_setup  # the single-process fine-tune's checkpoint is the base to adapt
    keys = [f"data={tmp / 'ex'}", f"model={base}", "model_overrides={}", "lora_rank=4", "lora_dropout=0.0"]
    lora = [arg for k in keys for arg in ("--set", k)]
    ref = train(load_train_config(cfg, keys + [f"out={tmp / 'lora-single'}", "micro_batch=4"]))
    out = tmp / "lora-fsdp"
    _torchrun(cfg, out, *lora, "--fsdp", "--set", "max_steps=2")
    _torchrun(cfg, out, *lora, "--fsdp", "--resume", "--merge")
    loss, val = _records(out)
    ref_loss, ref_val = _records(ref.log_path.parent)
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(val), torch.tensor(ref_val), rtol=1e-5, atol=1e-6)
    ours = load_file(out / "checkpoints" / f"step-{STEPS:06d}" / "adapter_model.safetensors")
    theirs = load_file(ref.checkpoint / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5)
    assert (out / "merged" / "model.safetensors").exists()
