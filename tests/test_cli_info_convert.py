"""`phiforge info` and `phiforge convert` through the CLI: output, exit codes, one-line errors, --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phiforge.checkpoint import INDEX_NAME, SAFE_NAME, load_checkpoint, save_checkpoint
from phiforge.cli import main
from phiforge.config import preset
from tests.test_checkpoint import as_dtype, logits, to_original_layout
from tests.test_tokenizer import CORPUS

REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *parts):
    assert code == 2
    assert err.startswith("phiforge: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for p in parts:
        assert p in err, (p, err)


@pytest.fixture
def ckpt(tiny_model, tmp_path):
    from phiforge.tokenizer import train_tokenizer

    tok = train_tokenizer(CORPUS, vocab_size=400)
    return save_checkpoint(tiny_model, tmp_path / "ckpt", dtype=torch.bfloat16, tokenizer=tok)


def test_info_checkpoint_text(ckpt, tiny_model, capsys):
    code, out, err = run(["info", str(ckpt)], capsys)
    assert code == 0 and err == ""
    n = tiny_model.num_params()
    assert f"{n:,} total" in out
    assert f"{tiny_model.num_params(include_embedding=False):,} non-embedding" in out
    assert "stored dtype    bfloat16" in out
    size = (ckpt / SAFE_NAME).stat().st_size
    assert f"{size:,} bytes" in out and "KiB" in out
    assert "head dim        16" in out and "rotary dim      8" in out
    assert "tokenizer       " in out and "eos '<|endoftext|>'" in out
    for field in tiny_model.config.to_dict():  # every config field is printed
        assert f"  {field} " in out


def test_info_checkpoint_json(ckpt, tiny_model, capsys):
    code, out, _ = run(["info", str(ckpt), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["kind"] == "checkpoint"
    assert info["params"] == {"total": tiny_model.num_params(),
                              "non_embedding": tiny_model.num_params(include_embedding=False)}
    assert info["weights"]["dtype"] == "bfloat16"
    assert info["weights"]["bytes"] == (ckpt / SAFE_NAME).stat().st_size
    assert info["weights"]["tensors"] == len(tiny_model.state_dict())
    assert info["config"] == tiny_model.config.to_dict() | {"name": info["config"]["name"]}
    assert info["head_dim"] == 16 and info["rotary_dim"] == 8
    from phiforge.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    assert info["tokenizer"]["present"] and info["tokenizer"]["size"] == len(tok)
    assert info["tokenizer"]["fits_model_vocab"] is False  # a 256-row tiny model cannot hold this tokenizer


@pytest.mark.parametrize("name", ["phi-2", "tiny"])
def test_info_preset(name, capsys):
    code, out, _ = run(["info", name, "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    cfg = preset(name)
    assert info["kind"] == "preset" and info["weights"] is None
    assert info["params"]["total"] == cfg.num_params()
    assert info["size_if_stored"] == {"float32": 4 * cfg.num_params(), "bfloat16": 2 * cfg.num_params()}
    if name == "phi-2":
        assert info["params"]["total"] == 2_779_683_840  # microsoft/phi-2's parameter count
    code, out, _ = run(["info", name], capsys)
    assert code == 0 and "sizes if stored: fp32" in out


def test_info_original_layout(tiny_model, tmp_path, capsys):
    src = to_original_layout(tiny_model, tmp_path / "orig")
    code, out, _ = run(["info", str(src), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert "original" in info["kind"] and info["params"]["total"] == tiny_model.num_params()


def test_info_errors(tmp_path, capsys):
    code, _, err = run(["info", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err, str(tmp_path / "missing"), "preset")
    code, _, err = run(["info", str(tmp_path)], capsys)
    assert_one_line_error(code, err, str(tmp_path), "config.json")
    (tmp_path / "config.json").write_text('{"model_type": "phi", "hidden_size": 64, "bogus": 1}')
    code, _, err = run(["info", str(tmp_path)], capsys)
    assert_one_line_error(code, err, str(tmp_path / "config.json"), "'bogus'")


def test_convert_original_via_cli(tiny_model, tmp_path, capsys):
    src = to_original_layout(tiny_model, tmp_path / "orig")
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    out = tmp_path / "hf"
    code, stdout, err = run(["convert", str(src), str(out), "--dtype", "bf16"], capsys)
    assert code == 0, err
    assert str(out) in stdout
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    model = load_checkpoint(out)
    assert model.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits(model), logits(as_dtype(tiny_model, torch.bfloat16)), rtol=0, atol=0)
    # OUT exists: refused without --force, replaced with it
    code, _, err = run(["convert", str(src), str(out)], capsys)
    assert_one_line_error(code, err, str(out), "--force")
    code, _, err = run(["convert", str(src), str(out), "--force", "--max-shard-size", "40KB"], capsys)
    assert code == 0, err
    assert (out / INDEX_NAME).exists()
    torch.testing.assert_close(logits(load_checkpoint(out)), logits(tiny_model), rtol=0, atol=0)


def test_convert_errors(tiny_model, tmp_path, capsys):
    code, _, err = run(["convert", str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, str(tmp_path / "nope"))
    src = to_original_layout(tiny_model, tmp_path / "orig")
    (src / SAFE_NAME).write_bytes((src / SAFE_NAME).read_bytes()[:1000])
    code, _, err = run(["convert", str(src), str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, str(src / SAFE_NAME))
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:  # argparse rejects a bad --dtype with its usage message, exit 2
        main(["convert", str(src), str(tmp_path / "out"), "--dtype", "fp8"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["info", "convert"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: phiforge {command}" in out
    assert "--json" in out if command == "info" else "--dtype" in out and "--max-shard-size" in out
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and f"  {command} " in out


def test_subprocess_info_and_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "phiforge", "info", "tiny", "--json"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"]["total"] == preset("tiny").num_params()
    r = subprocess.run([sys.executable, "-m", "phiforge", "info", str(tmp_path / "nope")], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("phiforge: error: ") and "Traceback" not in r.stderr
