"""The OpenAI-compatible teacher (phiforge.lm.openai_api behind make_teacher) against a fake server on 127.0.0.1
that injects faults deterministically: timeouts, 500/503, truncated bodies, cut connections, malformed
responses, slow and stalled streams."""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from collections import Counter

import pytest
from conftest import JSONServer

from phiforge.data.synth.pipeline import SynthConfig, read_samples, run_synth
from phiforge.data.synth.teachers import make_teacher
from phiforge.lm.base import BudgetExceeded
from phiforge.lm.openai_api import EndpointError

CLIENT_TIMEOUT = 0.6
VOCAB = ["w" + chr(97 + i % 26) + chr(97 + i // 26) for i in range(500)]  # letters: a passage, not noise


def answer_for(prompt: str) -> str:
    """The server's deterministic answer: code for code prompts, otherwise prompt-seeded words."""
    m = re.search(r"function named `(\w+)`", prompt)
    if m:
        f = m.group(1)
        return (f"Here is the exercise.\n```python\ndef {f}(x):\n    \"\"\"Return x doubled.\"\"\"\n    return 2 * x\n\n"
                f"assert {f}(1) == 2\nassert {f}(0) == 0\nassert {f}(-3) == -6\n```\n")
    rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    return "Lesson. " + " ".join(rng.choice(VOCAB) for _ in range(60)) + "."  # whole: synth trims cut passages


class FakeOpenAI(JSONServer):
    """Per prompt, attempts 0 and 1 get faults from `faults` (chosen by prompt hash); attempt 2+ succeeds."""

    FAULTS = ("timeout", "500", "503", "truncated_json", "cut_connection", "malformed", "no_text", "slow_ok")
    STREAM_FAULTS = ("stall", "stream_cut", "500", "slow_stream", "timeout")

    def __init__(self, faults: bool = True):
        self.faults = faults
        self.attempts: Counter = Counter()
        self.successes: Counter = Counter()
        self.lock = threading.Lock()
        self.start()

    def _send(self, h, code: int, payload: bytes, length: int | None = None):
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload) if length is None else length))
        h.end_headers()
        h.wfile.write(payload)
        h.wfile.flush()

    def handle(self, h, body):
        chat = h.path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        stream = bool(body.get("stream"))
        with self.lock:
            attempt = self.attempts[prompt]
            self.attempts[prompt] += 1
        table = self.STREAM_FAULTS if stream else self.FAULTS
        hsh = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        fault = table[(hsh + attempt) % len(table)] if self.faults and attempt < 2 else "ok"
        text = answer_for(prompt)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                 "total_tokens": len(prompt.split()) + len(text.split())}
        if fault == "timeout":
            time.sleep(CLIENT_TIMEOUT + 0.4)
            return self._send(h, 200, b"{}")
        if fault in ("500", "503"):
            return self._send(h, int(fault), json.dumps({"error": {"message": "overloaded"}}).encode())
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat
                  else {"index": 0, "text": text, "finish_reason": "stop"})
        full = json.dumps({"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                           "model": body["model"], "choices": [choice], "usage": usage}).encode()
        if stream:
            return self._stream(h, chat, text, usage, fault, prompt)
        if fault == "truncated_json":
            return self._send(h, 200, full[: len(full) // 2])
        if fault == "cut_connection":
            self._send(h, 200, full[: len(full) // 2], length=len(full))
            h.close_connection = True
            return
        if fault == "malformed":
            return self._send(h, 200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
        if fault == "no_text":
            bad = dict(choice)
            bad.pop("message", None)
            bad.pop("text", None)
            bad["finish_reason"] = None
            return self._send(h, 200, json.dumps({"id": "x", "choices": [bad], "model": "m", "created": 0,
                                                  "object": "chat.completion"}).encode())
        if fault == "slow_ok":
            time.sleep(CLIENT_TIMEOUT * 0.5)
        with self.lock:
            self.successes[prompt] += 1
        return self._send(h, 200, full)

    def _stream(self, h, chat, text, usage, fault, prompt):
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        words = text.split(" ")
        pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]

        def event(obj):
            h.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            h.wfile.flush()

        def chunk(piece, finish=None):
            c = ({"index": 0, "delta": {"content": piece}, "finish_reason": finish} if chat
                 else {"index": 0, "text": piece, "finish_reason": finish})
            return {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                    "model": "m", "choices": [c]}
        for i, p in enumerate(pieces):
            if fault == "stall" and i == 3:
                time.sleep(CLIENT_TIMEOUT + 0.4)
                return
            if fault == "stream_cut" and i == len(pieces) // 2:
                return
            if fault == "slow_stream" and i % 10 == 0:
                time.sleep(0.02)
            event(chunk(p))
        event(chunk("", "stop"))
        event({**chunk("", None), "choices": [], "usage": usage})
        h.wfile.write(b"data: [DONE]\n\n")
        h.wfile.flush()
        with self.lock:
            self.successes[prompt] += 1


@pytest.fixture
def fake():
    server = FakeOpenAI()
    yield server
    server.close()


def _teacher(url, **kw):
    opts = dict(concurrency=4, timeout=CLIENT_TIMEOUT, max_retries=4, backoff=0.01, max_backoff=0.05)
    opts.update(kw)
    return make_teacher(f"openai:fake-model@{url}", **opts)


@pytest.mark.parametrize("chat,stream", [(True, False), (False, False), (True, True)])
def test_every_fault_is_survived_in_order(fake, chat, stream):
    t = _teacher(fake.url, chat=chat, stream=stream)
    prompts = [f"Explain topic number {i} carefully." for i in range(16)]
    out = t.generate(prompts, {"max_new_tokens": 64, "temperature": 0.5})
    assert out == [answer_for(p) for p in prompts]
    assert t.usage.requests == 16 and t.usage.retries > 0 and t.usage.failures == 0
    assert t.usage.completion_tokens == sum(len(answer_for(p).split()) for p in prompts)
    assert all(fake.successes[p] == 1 for p in prompts)


def test_retries_exhausted_is_an_error(fake):
    t = _teacher(fake.url, max_retries=0)
    with pytest.raises(EndpointError, match="gave up"):
        t.generate([f"prompt {i}" for i in range(8)], {"max_new_tokens": 16})


def test_budget_stops_before_exceeding_and_keeps_finished(fake):
    t = _teacher(fake.url, price_per_1k_input=1.0, price_per_1k_output=1.0, budget=0.5, concurrency=2)
    prompts = [f"Budgeted prompt {i}" for i in range(40)]
    with pytest.raises(BudgetExceeded) as e:
        t.generate(prompts, {"max_new_tokens": 64})
    done = [x for x in e.value.partial if x is not None]
    assert 0 < len(done) < 40 and t.usage.cost <= 0.5
    assert all(x == answer_for(p) for x, p in zip(e.value.partial, prompts) if x is not None)


def _synth_cfg(url, **kw):
    opts = dict(concurrency=4, timeout=CLIENT_TIMEOUT, max_retries=4, backoff=0.01, max_backoff=0.05)
    opts.update(kw.pop("teacher_options", {}))
    base = dict(n=24, seed=5, mix={"textbooks": 1.0}, teacher=f"openai:fake-model@{url}", teacher_options=opts,
                sampling={"max_new_tokens": 64, "temperature": 0.7}, batch_size=8, sandbox_workers=2)
    base.update(kw)
    return SynthConfig.from_dict(base)


def test_synth_through_a_flaky_endpoint_loses_and_duplicates_nothing(tmp_path):
    clean = FakeOpenAI(faults=False)
    try:
        run_synth(_synth_cfg(clean.url), tmp_path / "clean", log=lambda m: None)
    finally:
        clean.close()
    flaky = FakeOpenAI(faults=True)
    try:
        stats = run_synth(_synth_cfg(flaky.url), tmp_path / "flaky", log=lambda m: None)
    finally:
        flaky.close()
    a, b = read_samples(tmp_path / "clean"), read_samples(tmp_path / "flaky")
    assert len(b) == 24 == stats["kept"]
    assert len({r["key"] for r in b}) == 24
    assert sorted((r["key"], r["text"]) for r in a) == sorted((r["key"], r["text"]) for r in b)
    assert stats["teacher_usage"]["retries"] > 0 and stats["teacher_usage"]["failures"] == 0
    assert all(v == 1 for v in flaky.successes.values())  # no prompt answered twice
    codes = [r for r in b if r["kind"] == "code"]
    assert codes and all(r["tests"] == "passed" and r["task"]["tests"].count("assert") == 3 for r in codes)
    assert stats["code"]["pass_rate"] == 1.0


def test_budget_stops_a_synth_run_cleanly_and_a_rerun_resumes(tmp_path):
    server = FakeOpenAI(faults=False)
    try:
        priced = {"price_per_1k_input": 1.0, "price_per_1k_output": 1.0}
        cfg = _synth_cfg(server.url, teacher_options={**priced, "budget": 0.6}, n=30)
        msgs = []
        stats = run_synth(cfg, tmp_path / "o", log=msgs.append)
        first = read_samples(tmp_path / "o")
        assert stats["stopped"] == "budget" and 0 < stats["kept"] < 30 and stats["cost"] <= 0.6
        assert any("budget" in m for m in msgs)
        asked = sum(server.successes.values())
        cfg2 = _synth_cfg(server.url, teacher_options={**priced, "budget": 100.0}, n=30)
        stats2 = run_synth(cfg2, tmp_path / "o", log=lambda m: None)
        recs = read_samples(tmp_path / "o")
        assert stats2["kept"] == 30 and recs[: len(first)] == first and len({r["key"] for r in recs}) == 30
        assert all(v == 1 for v in server.successes.values())  # finished prompts never asked again
        assert sum(server.successes.values()) > asked
        assert stats2["cost"] > stats["cost"]  # cost accumulates over sessions
    finally:
        server.close()
