"""Training: config handling, schedule, parameter groups, a real tiny run, checkpoints, fine-tuning, bad input."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from phiforge.errors import ConfigError, DataError
from phiforge.train import load_train_config, train
from phiforge.train.config import TrainConfig, from_dict

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "def", "foo", "return", "x", "print", "hello", "world", "python", "code", "loop", "list"]


def make_tokens(tmp_path, n_docs=200, words=40, name="tok"):
    """A small packed corpus (trained tokenizer of <= 300 ids) under tmp_path/name."""
    from phiforge.data.pack import pack_corpus

    rng = random.Random(0)
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n"
                           for _ in range(n_docs)))
    pack_corpus([src], tmp_path / name, train_vocab=300, val_fraction=0.1, workers=1)
    return tmp_path / name


def tiny_train_config(tmp_path, data, **kw) -> TrainConfig:
    base = dict(model="tiny", model_overrides={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                               "num_attention_heads": 2, "max_position_embeddings": 64},
                data=str(data), out=str(tmp_path / "run"), seq_len=32, micro_batch=4, max_steps=8, warmup=2,
                lr=3e-3, min_lr=3e-4, eval_every=4, eval_batches=2, save_every=4, keep_last=1, threads=1)
    base.update(kw)
    return from_dict(base)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_tokens(tmp_path_factory.mktemp("data"))


# ---- config ---------------------------------------------------------------------------------------------------
def test_unknown_keys_are_rejected_naming_key_and_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: tiny\nmax_steps: 10\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:3: unknown train config key\(s\) 'learning_rate'"):
        load_train_config(p)
    with pytest.raises(ConfigError, match="unknown train config key 'lrr'"):
        load_train_config("tiny", ["lrr=1"])
    with pytest.raises(ConfigError, match="schedule 'cosin'"):
        load_train_config("tiny", ["schedule=cosin"])
    with pytest.raises(ConfigError, match="micro_batch should be int"):
        load_train_config("tiny", ["micro_batch=abc"])


def test_overrides_and_shipped_recipes():
    cfg = load_train_config("tiny", ["lr=3e-4", "train.max_steps=7", "model_overrides.num_hidden_layers=2",
                                     "betas=[0.9, 0.98]"])
    assert cfg.lr == 3e-4 and cfg.max_steps == 7 and cfg.model_overrides == {"num_hidden_layers": 2}
    assert cfg.betas == (0.9, 0.98)
    p15 = load_train_config("phi-1.5")
    # arXiv 2309.05463: constant lr 2e-4, no warmup, wd 0.1, Adam (0.9, 0.98), eps 1e-7, batch 2048 x 2048.
    assert (p15.lr, p15.schedule, p15.warmup, p15.weight_decay, p15.betas, p15.eps, p15.seq_len) == \
        (2e-4, "constant", 0, 0.1, (0.9, 0.98), 1e-7, 2048)
    assert p15.micro_batch * p15.grad_accum * 8 == 2048
    p2 = load_train_config("phi-2")
    assert p2.model == "phi-2" and p2.seq_len == 2048 and p2.max_tokens == 1_400_000_000_000


def test_schedule_shapes():
    from phiforge.train.optim import LRSchedule

    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup=10, schedule="cosine")
    s = LRSchedule(cfg, 100)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0) and s.lr_at(100) == pytest.approx(0.1)
    assert s.lr_at(55) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    lin = LRSchedule(cfg.replace(schedule="linear"), 100)
    assert lin.lr_at(55) == pytest.approx(0.55)
    const = LRSchedule(cfg.replace(schedule="constant", warmup=0), 100)
    assert const.lr_at(0) == const.lr_at(99) == 1.0


def test_no_weight_decay_on_norms_biases_embeddings(tiny_model):
    from phiforge.train.optim import param_groups

    decay, no_decay = param_groups(tiny_model, 0.1)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "model.embed_tokens.weight" in nd and "model.final_layernorm.weight" in nd
    assert all(n.endswith(".bias") or "layernorm" in n or "embed" in n for n in nd)
    assert "lm_head.weight" in d and "model.layers.0.mlp.fc1.weight" in d
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_chunked_loss_equals_plain_loss():
    from phiforge.train.parallel import lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    h = torch.randn(2, 12, 16, requires_grad=True)
    t = torch.randint(0, 50, (2, 12))
    plain = lm_loss(h, head, t, chunk=0)
    g_plain = torch.autograd.grad(plain, [h, head.weight])
    chunked = lm_loss(h, head, t, chunk=5)
    g_chunk = torch.autograd.grad(chunked, [h, head.weight])
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(g_chunk, g_plain):
        torch.testing.assert_close(a, b)


# ---- a real run -----------------------------------------------------------------------------------------------
def test_tiny_run_learns_logs_and_checkpoints(tmp_path, tokens):
    from phiforge.checkpoint import load_checkpoint
    from phiforge.train.metrics import read_log

    cfg = tiny_train_config(tmp_path, tokens, max_steps=24, eval_every=8, save_every=8, keep_last=2, lr=1e-2,
                            min_lr=1e-3)
    res = train(cfg)
    recs = read_log(res.log_path)
    assert [r["step"] for r in recs] == list(range(1, 25))
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0  # it learns the word distribution
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in recs)
    evals = read_log(res.log_path, "eval")
    assert [e["step"] for e in evals] == [8, 16, 24] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert res.val_loss == evals[-1]["val_loss"]
    # keep_last=2: steps 16 and 24 remain; each is a loadable HF checkpoint with tokenizer and trainer state.
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000016", "step-000024"] and res.checkpoint.name == "step-000024"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "train_config.yaml"):
        assert (res.checkpoint / f).exists()
    model = load_checkpoint(res.checkpoint)
    assert model.config.vocab_size == 320 and model.config.num_hidden_layers == 2
    # Starting again into a directory with checkpoints needs --resume.
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)
    # Fine-tuning from the checkpoint with the same command (model = checkpoint directory).
    ft = train(tiny_train_config(tmp_path, tokens, model=str(res.checkpoint), model_overrides={},
                                 out=str(tmp_path / "ft"), max_steps=4, lr=1e-3, warmup=0))
    first = read_log(ft.log_path)[0]["loss"]
    assert first < recs[0]["loss"] - 1.0  # starts from the trained weights, not from scratch
    other = make_tokens(tmp_path, n_docs=30, words=10, name="other")  # another tokenizer
    with pytest.raises(DataError, match="different tokenizer"):
        train(tiny_train_config(tmp_path, other, model=str(res.checkpoint), model_overrides={},
                                out=str(tmp_path / "ft2")))


def test_transformers_can_load_a_training_checkpoint(tmp_path, tokens):
    transformers = pytest.importorskip("transformers")
    res = train(tiny_train_config(tmp_path, tokens, max_steps=2, eval_every=0, save_every=0))
    from phiforge.checkpoint import load_checkpoint

    hf = transformers.PhiForCausalLM.from_pretrained(res.checkpoint).eval()
    ours = load_checkpoint(res.checkpoint).eval()
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_clear_errors(tmp_path, tokens):
    with pytest.raises(ConfigError, match="seq_len 128 exceeds the model's context"):
        train(tiny_train_config(tmp_path, tokens, seq_len=128))
    small = make_tokens(tmp_path, n_docs=3, words=10, name="small")
    with pytest.raises(DataError, match="fewer than one global batch"):
        train(tiny_train_config(tmp_path, small, out=str(tmp_path / "r2")))
    with pytest.raises(DataError, match="no manifest.json"):
        train(tiny_train_config(tmp_path, tmp_path / "missing", out=str(tmp_path / "r3")))


def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path, tokens):
    from phiforge.train.loop import TrainingError

    # A huge lr blows the weights up within a few steps; the run must stop on the first non-finite loss.
    cfg = tiny_train_config(tmp_path, tokens, lr=1e12, min_lr=1e12, warmup=0, schedule="constant", grad_clip=0,
                            save_every=1, keep_last=1, max_steps=50, eval_every=0)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step (\d+).*Last good checkpoint: .*step-") as e:
        train(cfg)
    import re

    bad_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts[-1].name == f"step-{bad_step - 1:06d}"  # the last good step's checkpoint is kept


def test_cli_exit_codes(tmp_path, tokens, capsys):
    from phiforge.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text("model: tiny\nmax_steps: 3\nfoo: 1\n")
    assert main(["train", "--config", str(p)]) == 2
    assert "unknown train config key(s) 'foo'" in capsys.readouterr().err
    args = ["--quiet", "train", "--config", "tiny", "--set", f"data={tokens}", "--set", f"out={tmp_path / 'c'}",
            "--set", "max_steps=2", "--set", "seq_len=32", "--set", "micro_batch=2", "--set", "threads=1",
            "--set", "model_overrides.num_hidden_layers=1", "--set", "model_overrides.max_position_embeddings=64"]
    assert main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out


def test_activation_checkpointing_same_losses_and_tensorboard(tmp_path, tokens):
    pytest.importorskip("tensorboard")
    kw = dict(max_steps=3, eval_every=0, save_every=0)
    a = train(tiny_train_config(tmp_path, tokens, out=str(tmp_path / "a"), tensorboard=True, **kw))
    b = train(tiny_train_config(tmp_path, tokens, out=str(tmp_path / "b"), activation_checkpointing=True, **kw))
    torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(a.losses), rtol=1e-6, atol=0)
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents*"))
    # Parameter names stay HF's (no wrapper prefixes), so the checkpoint loads as usual.
    from phiforge.checkpoint import load_checkpoint

    assert load_checkpoint(b.checkpoint).config.num_hidden_layers == 2


@pytest.mark.slow
def test_compile_same_losses(tmp_path, tokens):
    kw = dict(max_steps=3, eval_every=0, save_every=0)
    a = train(tiny_train_config(tmp_path, tokens, out=str(tmp_path / "a"), **kw))
    b = train(tiny_train_config(tmp_path, tokens, out=str(tmp_path / "b"), compile=True, **kw))
    torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(a.losses), rtol=1e-4, atol=1e-5)
