"""Chat prompts (template vs Phi's Instruct format), the chat session's history, and `phiforge chat` on a
scripted stdin."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from conftest import tiny_config

TEXTS = ["Instruct: say hello\nOutput: hello there, friend.", "the cat sat on the mat."] * 10
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi
    from phiforge.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    model = Phi(tiny_config(vocab_size=320))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, path, tokenizer=tok)
    return path


def test_instruct_format_for_base_models():
    from phiforge.serve.chat import format_chat

    class Tok:
        chat_template = None

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    prompt, stops = format_chat(Tok(), msgs)
    assert prompt == "Be brief.\nInstruct: hi\nOutput: hello\nInstruct: 2+2?\nOutput:"
    assert "\nInstruct:" in stops
    with pytest.raises(ValueError, match="role"):
        format_chat(Tok(), [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="empty"):
        format_chat(Tok(), [])


def test_chat_template_is_used_when_present(ckpt, tmp_path):
    import transformers

    from phiforge.serve.chat import format_chat
    from phiforge.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    tok.chat_template = TEMPLATE
    tok.save(tmp_path)
    tok = load_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    prompt, stops = format_chat(tok, msgs)
    assert prompt == "<|user|>hi<|endoftext|><|assistant|>yo<|endoftext|><|user|>?<|endoftext|><|assistant|>"
    assert stops == []
    # The same text transformers renders from the same directory.
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == prompt


def test_session_keeps_history_and_resets(ckpt):
    from phiforge.serve.chat import ChatSession, chat_loop
    from phiforge.serve.load import load_engine

    engine = load_engine(str(ckpt))
    s = ChatSession(engine, max_tokens=4)
    pieces: list[str] = []
    a1 = s.reply("say hello", pieces.append)
    assert "".join(pieces).strip() == a1
    assert s.history == [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": a1}]
    ids, _ = s.prompt_ids("again")
    assert engine.tokenizer.decode(ids) == f"Instruct: say hello\nOutput: {a1}\nInstruct: again\nOutput:"
    s.reply("again")
    assert len(s.history) == 4
    s.reset()
    assert s.history == []
    # The loop: /reset clears, end of input (no /exit) ends cleanly, the line after /exit is never read.
    out = io.StringIO()
    assert chat_loop(s, io.StringIO("say hello\n/reset\n"), out) == 0
    assert "[conversation cleared]" in out.getvalue() and s.history == []
    stdin = io.StringIO("say hello\n/exit\nnot read\n")
    assert chat_loop(s, stdin, io.StringIO()) == 0
    assert stdin.readline() == "not read\n" and len(s.history) == 2
    # A history longer than the context is trimmed from the oldest turn, keeping room for the reply.
    s.history = [{"role": "user", "content": "the cat sat " * 20}, {"role": "assistant", "content": "ok"}] * 5
    ids, _ = s.prompt_ids("last")
    assert len(ids) + s.max_tokens < engine.context
    assert engine.tokenizer.decode(ids).endswith("Instruct: last\nOutput:")


def test_chat_cli_scripted_stdin(ckpt):
    script = "say hello\nand again\n/reset\nhi\n/exit\nnever read\n"
    r = subprocess.run([sys.executable, "-m", "phiforge", "chat", "--model", str(ckpt), "--max-tokens", "3"],
                       input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "/exit" in r.stdout.splitlines()[0]  # the help line
    assert "[conversation cleared]" in r.stdout
    assert r.stdout.count("[conversation cleared]") == 1
    bad = subprocess.run([sys.executable, "-m", "phiforge", "chat", "--model", str(ckpt), "--max-tokens", "0"],
                         input="", capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "phiforge: error:" in bad.stderr
