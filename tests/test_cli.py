"""The command line: every command's --help loads, shared flags have one spelling (old ones still parse, hidden),
and `phiforge chat` runs without the HTTP stack."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from phiforge.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_answers_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: phiforge {name}" in capsys.readouterr().out


def parser_of(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"phiforge {name}")
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    return parser


def parse(name: str, *argv: str) -> dict:
    return vars(parser_of(name).parse_args(list(argv)))


BASE = {"chat": ["--model", "m"], "serve": ["--model", "m"], "generate": ["--model", "m", "p"], "eval": [],
        "annotate": ["--stdlib", "1", "--out", "o", "--teacher", "t"], "grow": ["--from", "a", "--to", "b", "--out", "c"],
        "convert": ["a", "b"]}


@pytest.mark.parametrize("name,new,old", [
    ("chat", ["--max-new-tokens", "7"], ["--max-tokens", "7"]),
    ("generate", ["--max-new-tokens", "7"], ["--max-tokens", "7"]),
    ("annotate", ["--max-new-tokens", "7"], ["--max-tokens", "7"]),
    ("eval", ["--max-new-tokens", "7"], ["--max-tokens", "7"]),
    ("eval", ["--cot-max-new-tokens", "7"], ["--cot-max-tokens", "7"]),
    ("eval", ["--out", "r.json"], ["--output", "r.json"]),
    ("eval", ["--dtype", "bf16"], ["--dtype", "bfloat16"]),
    ("chat", ["--dtype", "fp16"], ["--dtype", "float16"]),
    ("serve", ["--dtype", "fp32"], ["--dtype", "float32"]),
    ("generate", [], ["--dtype", "auto"]),
    ("grow", ["--dtype", "bf16"], ["--dtype", "bfloat16"]),
    ("convert", [], ["--dtype", "auto"]),
])
def test_old_spellings_parse_to_the_same_values(name, new, old):
    assert parse(name, *BASE[name], *new) == parse(name, *BASE[name], *old)


def test_one_spelling_in_help_and_defaults_kept(capsys):
    for name in ("chat", "generate", "annotate", "eval"):
        text = parser_of(name).format_help()
        assert "--max-new-tokens" in text and "--max-tokens " not in text and "--output" not in text
        assert "{fp32,bf16,fp16}" in text or name == "annotate"
    assert parse("chat", *BASE["chat"])["max_new_tokens"] == 256
    assert parse("eval")["cot_max_new_tokens"] == 128 and parse("eval")["dtype"] is None
    assert parse("generate", *BASE["generate"])["max_new_tokens"] == 128
    with pytest.raises(SystemExit):  # argparse's own wording, as when --dtype had `choices`
        parse("chat", *BASE["chat"], "--dtype", "int3")
    assert "invalid choice: 'int3' (choose from fp32, bf16, fp16)" in capsys.readouterr().err


def test_chat_builds_its_engine_without_fastapi(tmp_path):
    """`phiforge chat` loads the model through phiforge.serve.load, never the HTTP server module."""
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi
    from phiforge.tokenizer import model_vocab_size, train_tokenizer
    from tests.conftest import tiny_config

    tok = train_tokenizer(["Instruct: hi\nOutput: hello there. " * 20], 300)
    torch.manual_seed(0)
    save_checkpoint(Phi(tiny_config(vocab_size=model_vocab_size(tok))), tmp_path / "ckpt", tokenizer=tok)
    code = ("import io, sys\n"
            "from phiforge.cli import main\n"
            "sys.stdin = io.StringIO('hi\\n/exit\\n')\n"
            f"rc = main(['chat', '--model', {str(tmp_path / 'ckpt')!r}, '--max-new-tokens', '4'])\n"
            "print('RC', rc, [m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "RC 0 []"
