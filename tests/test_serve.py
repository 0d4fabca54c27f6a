"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from conftest import tiny_config

TEXTS = ["the cat sat on the mat. the dog sat on the log.", "hello world, how are you today?",
         "Instruct: say hello\nOutput: hello there, friend.", "def add(a, b):\n    return a + b\n"] * 10


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi
    from phiforge.serve.load import load_engine
    from phiforge.serve.server import BackgroundServer, Server
    from phiforge.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS, 320)
    torch.manual_seed(0)
    model = Phi(tiny_config(vocab_size=320))
    with torch.no_grad():  # bigger weights than the init: peaked, input-dependent next-token distributions
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny-chat"
    save_checkpoint(model, ckpt, tokenizer=tok)
    engine = load_engine(str(ckpt))
    server = Server(engine, "tiny-chat", batch_wait_ms=20)
    with BackgroundServer(server.app) as bg:
        yield bg, server, engine
    server.batcher.close()


@pytest.fixture(scope="module")
def client(served):
    import openai

    bg, _, _ = served
    return openai.OpenAI(base_url=bg.url, api_key="x", max_retries=0, timeout=60)


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"


def test_completion_matches_engine_greedy(client, served):
    from phiforge.lm.sampling import Sampling
    from phiforge.serve.engine import Request

    _, _, engine = served
    r = client.completions.create(model="tiny-chat", prompt="the cat", max_tokens=8, temperature=0)
    ref = engine.run([Request(engine.tokenizer.encode("the cat"), Sampling(max_new_tokens=8))])[0]
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode("the cat"))
    assert r.usage.completion_tokens == len(ref.token_ids)


def test_completion_logprobs_and_echo(client, served):
    import torch

    _, _, engine = served
    tok = engine.tokenizer
    r = client.completions.create(model="tiny-chat", prompt="hello world", max_tokens=5, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    # (tokens are decoded one by one, so a byte-level token holding half a character shows as U+FFFD)
    assert all(isinstance(t, str) for t in lp.tokens) and lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0
        assert abs(max(top.values()) - chosen) < 1e-4  # greedy: the chosen token is the most likely
    # The logprob of the first generated token equals the model's own log-softmax.
    ids = tok.encode("hello world")
    with torch.no_grad():
        ref = engine.model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
    assert abs(lp.token_logprobs[0] - ref.max().item()) < 1e-4

    e = client.completions.create(model="tiny-chat", prompt="hello world", max_tokens=2, temperature=0, logprobs=1,
                                  echo=True)
    elp = e.choices[0].logprobs
    assert e.choices[0].text.startswith("hello world")
    assert elp.token_logprobs[0] is None and len(elp.tokens) == len(ids) + 2
    with torch.no_grad():
        full = engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)
    for t in range(1, len(ids)):
        assert abs(elp.token_logprobs[t] - full[t - 1, ids[t]].item()) < 1e-4


def test_chat_completion_uses_instruct_format(client, served):
    from phiforge.lm.sampling import Sampling
    from phiforge.serve.chat import format_chat
    from phiforge.serve.engine import Request

    _, _, engine = served
    msgs = [{"role": "user", "content": "say hello"}]
    r = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=10, temperature=0)
    prompt, stops = format_chat(engine.tokenizer, msgs)
    assert prompt == "Instruct: say hello\nOutput:"
    ref = engine.run([Request(engine.tokenizer.encode(prompt), Sampling(max_new_tokens=10, stop=stops))])[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text.lstrip()
    assert r.object == "chat.completion"


def test_streaming_equals_non_streaming(client):
    full = client.completions.create(model="tiny-chat", prompt="the dog", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="tiny-chat", prompt="the dog", max_tokens=12, temperature=0,
                                            stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason

    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=12, temperature=0)
    stream = list(client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_raw_sse_format(served):
    bg, _, _ = served
    body = json.dumps({"model": "tiny-chat", "prompt": "the", "max_tokens": 3, "temperature": 0, "stream": True})
    req = urllib.request.Request(bg.url + "/completions", data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_sampling_is_seeded(client):
    kw = dict(model="tiny-chat", prompt="the cat", max_tokens=10, temperature=1.0, seed=123)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_errors_are_openai_shaped(client, served):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt=None, max_tokens=2)  # sent as null: missing
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt="x", max_tokens=2, temperature=5)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt="x", max_tokens=100000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=[])
    # Malformed JSON and wrong types, sent raw.
    bg, _, _ = served
    for payload in (b"{not json", b'[1, 2]', b'{"model": "tiny-chat", "prompt": 5}',
                    b'{"model": "tiny-chat", "prompt": "x", "max_tokens": "many"}'):
        req = urllib.request.Request(bg.url + "/completions", data=payload, method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as he:
            urllib.request.urlopen(req, timeout=30)
        assert he.value.code == 400
        err = json.loads(he.value.read())["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    # The server is still healthy afterwards.
    assert client.completions.create(model="tiny-chat", prompt="the", max_tokens=1).choices


def test_concurrent_requests_are_batched_and_equal_sequential(client, served):
    _, server, _ = served
    prompts = ["the cat", "hello world, how", "def add(a", "the dog sat on", "Instruct: say", "x", "the mat. the",
               "how are you"]
    sequential = [client.completions.create(model="tiny-chat", prompt=p, max_tokens=8, temperature=0)
                  .choices[0].text for p in prompts]
    before = server.batcher.largest_batch
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        try:
            barrier.wait()
            r = client.completions.create(model="tiny-chat", prompt=prompts[i], max_tokens=8, temperature=0)
            results[i] = r.choices[0].text
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(prompts))] == sequential
    assert server.batcher.largest_batch > max(before, 1)  # some requests really shared a batch


def test_a_prompt_that_fills_the_context_is_context_length_exceeded(served):
    """A chat prompt of exactly the context's length, with no max_tokens: chat's default fills what is left,
    nothing here, so the request cannot run; it is `context_length_exceeded` (found by the schema fuzzer, which
    got `invalid_value` from the engine's own check)."""
    from phiforge.serve.validate import APIError

    _, server, engine = served
    for default_max in (0, 16):
        with pytest.raises(APIError) as e:
            server._request({}, [1] * engine.context, default_max=default_max)
        assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    assert server._request({}, [1] * (engine.context - 1), default_max=1).prompt_ids == [1] * (engine.context - 1)
