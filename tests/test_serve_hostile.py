"""The server under bad clients and hostile requests (issue 25): a bad request fails alone, big bodies never
stall other clients, a client that leaves stops its generation, malformed requests are 4xx JSON errors on a
connection that stays usable, unsupported fields are named, stream_options.include_usage works, the API key."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from conftest import tiny_checkpoint

TEXTS = ["the cat sat on the mat. the dog sat on the log.", "hello world, how are you today?",
         "Instruct: say hello\nOutput: hello there, friend."] * 10


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from phiforge.serve.load import load_engine

    return load_engine(str(tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TEXTS, 320, 1024)))


def serve(engine, **kw):
    """A Server on a background uvicorn; yields (bg, server)."""
    from phiforge.serve.server import BackgroundServer, Server

    server = Server(engine, "tiny", **{"batch_wait_ms": 30, **kw})
    bg = BackgroundServer(server.app).__enter__()
    return bg, server


@pytest.fixture(scope="module")
def served(engine):
    bg, server = serve(engine)
    yield bg, server
    bg.__exit__(None)
    server.close()


def post(conn: http.client.HTTPConnection, path: str, body: bytes | dict, headers: dict | None = None):
    """(status, parsed JSON or text) of a POST on a kept-alive connection."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    try:
        return r.status, json.loads(raw)
    except ValueError:
        return r.status, raw.decode(errors="replace")


def completion(bg, body: dict, timeout: float = 60) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", bg.port, timeout=timeout)
    try:
        return post(conn, "/v1/completions", body)
    finally:
        conn.close()


# ---- one bad request fails alone ---------------------------------------------------------------------------------
def test_bad_seed_is_a_400_and_its_batch_neighbours_succeed(served):
    bg, server = served
    good = {"model": "tiny", "prompt": "the cat", "max_tokens": 6, "temperature": 0}
    ref = completion(bg, good)[1]["choices"][0]["text"]
    bodies = [good] * 12 + [{"model": "tiny", "prompt": "x", "temperature": 0.5, "seed": 2 ** 64}]
    out: dict[int, tuple[int, dict]] = {}
    barrier = threading.Barrier(len(bodies))

    def call(i: int) -> None:
        barrier.wait()
        out[i] = completion(bg, bodies[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[i][0] for i in range(12)] == [200] * 12
    assert all(out[i][1]["choices"][0]["text"] == ref for i in range(12))
    status, err = out[12]
    assert status == 400 and err["error"]["param"] == "seed"


def test_engine_isolates_a_failing_row(engine):
    """A row that fails at run time (a seed the generator refuses: a float) fails alone."""
    from phiforge.lm.sampling import Sampling
    from phiforge.serve.engine import Request

    ids = engine.tokenizer.encode("the cat")
    good = [Request(ids, Sampling(max_new_tokens=5)),
            Request(ids, Sampling(temperature=1.0, seed=3, max_new_tokens=5))]
    bad = Request(ids, Sampling(temperature=1.0, seed=1.5, max_new_tokens=5))
    solo = [engine.run([r])[0] for r in good]
    with pytest.raises(RuntimeError):  # without isolate: the old contract, the error reaches the caller
        engine.run([bad])
    results = engine.run([good[0], bad, good[1]], isolate=True)
    assert results[1].finish_reason == "error" and isinstance(results[1].error, RuntimeError)
    assert [r.token_ids for r in (results[0], results[2])] == [r.token_ids for r in solo]
    assert results[0].error is None and results[2].error is None


def test_batcher_fails_a_job_alone_whatever_the_cause(engine):
    from phiforge.lm.sampling import Sampling
    from phiforge.serve.engine import Request
    from phiforge.serve.server import Batcher

    ids = engine.tokenizer.encode("hello world")

    def req(**kw) -> Request:
        return Request(list(ids), Sampling(max_new_tokens=4, **kw))

    (ref,) = engine.run([req()])
    batcher = Batcher(engine, batch_wait_ms=300)  # everything submitted below shares one batch
    try:
        def boom(k, text, info):
            raise OSError("the client's socket is gone")

        futs = [batcher.submit([req()]), batcher.submit([req(seed=2 ** 70, temperature=0.5)]),  # rejected
                batcher.submit([req()], on_text=boom), batcher.submit([req()])]  # its callback fails
        assert futs[0].result(30)[0].token_ids == ref.token_ids
        assert futs[3].result(30)[0].token_ids == ref.token_ids
        with pytest.raises(ValueError, match="seed"):
            futs[1].result(30)
        with pytest.raises(OSError):
            futs[2].result(30)
        # The batched model step itself failing (here: whenever a poisoned prompt is in it) reruns each job
        # alone, so only the poisoned one fails.
        real_run = engine.run

        def run(requests, on_text=None, **kw):
            if any(r.prompt_ids[0] == 7 for r in requests):
                raise RuntimeError("out of memory")
            return real_run(requests, on_text, **kw)

        engine.run = run
        try:
            futs = [batcher.submit([req()]), batcher.submit([Request([7, 8], Sampling(max_new_tokens=2))]),
                    batcher.submit([req()])]
            assert futs[0].result(30)[0].token_ids == ref.token_ids
            assert futs[2].result(30)[0].token_ids == ref.token_ids
            with pytest.raises(RuntimeError, match="out of memory"):
                futs[1].result(30)
        finally:
            del engine.run
        assert batcher.thread.is_alive()
    finally:
        batcher.close()


# ---- large bodies ------------------------------------------------------------------------------------------------
def health_latency(bg, stop: threading.Event) -> list[float]:
    """Times of /health calls made until `stop` (from another thread)."""
    times: list[float] = []

    def loop() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", bg.port, timeout=30)
        while not stop.is_set():
            t = time.perf_counter()
            conn.request("GET", "/health")
            conn.getresponse().read()
            times.append(time.perf_counter() - t)
            time.sleep(0.01)
        conn.close()

    th = threading.Thread(target=loop)
    th.start()
    stop.thread = th  # type: ignore[attr-defined]
    return times


def test_large_bodies_are_rejected_fast_and_never_stall_others(engine):
    bg, server = serve(engine, max_body_bytes=8 << 20)
    small_limit_bg, small_limit = serve(engine, max_body_bytes=1 << 20)
    try:
        stop = threading.Event()
        times = health_latency(bg, stop)
        t = time.perf_counter()
        status, err = completion(bg, {"model": "tiny", "prompt": "the cat sat " * 450_000})  # 5.4 MB
        took = time.perf_counter() - t
        stop.set()
        stop.thread.join()  # type: ignore[attr-defined]
        assert status == 400 and err["error"]["code"] == "context_length_exceeded", err
        assert took < 3, took  # it was refused before tokenizing
        assert times and max(times) < 1.0, max(times)
        # Above the body limit: 413 in OpenAI's shape, on a connection that still works afterwards.
        conn = http.client.HTTPConnection("127.0.0.1", small_limit_bg.port, timeout=30)
        status, err = post(conn, "/v1/completions", {"model": "tiny", "prompt": "x" * (2 << 20)})
        assert status == 413 and err["error"]["code"] == "request_too_large"
        status, ok = post(conn, "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 2})
        assert status == 200 and ok["choices"]
        conn.close()
    finally:
        for b, s in ((bg, server), (small_limit_bg, small_limit)):
            b.__exit__(None)
            s.close()


# ---- disconnects ---------------------------------------------------------------------------------------------------
class Slow:
    """A decoder that takes `delay` seconds a step: a 500-token generation lasts long enough to leave it."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def step(self, *a, **kw):
        time.sleep(self.delay)
        return self.inner.step(*a, **kw)

    def greedy_step(self, *a, **kw):
        time.sleep(self.delay)
        return self.inner.greedy_step(*a, **kw)


def raw_post(port: int, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_disconnected_clients_stop_their_generation(engine, monkeypatch):
    slow = Slow(engine.decoder, 0.02)  # 500 tokens: 10 s
    monkeypatch.setattr(engine, "decoder", slow)
    monkeypatch.setattr(engine, "step", slow.step)
    bg, server = serve(engine)
    try:
        long = {"model": "tiny", "prompt": "the cat", "max_tokens": 500, "temperature": 0, "ignore_eos": True}
        socks = [raw_post(bg.port, {**long, "stream": True}) for _ in range(4)]
        for s in socks:  # each has its first token: generation is under way
            got = b""
            while b"data: " not in got:
                got += s.recv(65536)
        t0 = time.perf_counter()
        for s in socks:
            s.close()
        # A non-streaming client leaving mid-generation is noticed too.
        s = raw_post(bg.port, long)
        time.sleep(0.3)
        s.close()
        deadline = time.monotonic() + 10
        while server.batcher.cancelled < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.batcher.cancelled == 5
        status, body = completion(bg, {"model": "tiny", "prompt": "the", "max_tokens": 3, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert time.perf_counter() - t0 < 4  # not the 10 s the dropped generations would have taken
    finally:
        bg.__exit__(None)
        server.close()


def test_engine_cancel_event_stops_a_row(engine):
    from phiforge.lm.sampling import Sampling
    from phiforge.serve.engine import Request

    ids = engine.tokenizer.encode("the cat")
    cancel = threading.Event()
    reqs = [Request(ids, Sampling(max_new_tokens=50), ignore_eos=True, cancel=cancel),
            Request(ids, Sampling(max_new_tokens=50), ignore_eos=True)]
    seen = [0]

    def on_text(row, text, info):
        if row == 0:
            seen[0] += 1
            if seen[0] == 3:
                cancel.set()

    a, b = engine.run(reqs, on_text)
    assert a.finish_reason == "cancelled" and len(a.token_ids) < 10
    assert b.finish_reason == "length" and len(b.token_ids) == 50


# ---- malformed requests: 4xx JSON, connection kept ----------------------------------------------------------------
DEEP = b"[" * 100_000 + b"]" * 100_000
MALFORMED = [  # (path, body, param the error names, or None)
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": {"a": 1}}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text",
                                                                                         "text": 3}]}]},
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
    ("/v1/chat/completions", {"model": "tiny", "messages": ["hi"]}, "messages[0]"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs"),
    ("/v1/completions", DEEP, None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": 1e999}', "temperature"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "seed": 1' + b"0" * 5000 + b"}", None),
    ("/v1/completions", b"", None),
    ("/v1/completions", b"\xff\xfe{", None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": 2 ** 64}, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": "7"}, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": [[1, 2], "x"]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [10 ** 9]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["x"] * 65}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": True, "stream_options": {"x": 1}},
     "stream_options.x"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [1]}, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a"] * 5}, "stop"),
]


def test_malformed_requests_are_4xx_json_and_the_connection_stays_usable(served):
    bg, server = served
    conn = http.client.HTTPConnection("127.0.0.1", bg.port, timeout=60)
    conn.connect()
    sock = conn.sock
    for path, body, param in MALFORMED:
        status, err = post(conn, path, body)
        assert 400 <= status < 500, (body if isinstance(body, dict) else body[:80], status, err)
        assert isinstance(err, dict) and err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
        if param is not None:
            assert err["error"]["param"] == param, (body, err)
        assert conn.sock is sock  # the server kept the connection open
    status, ok = post(conn, "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 2})
    assert status == 200 and ok["choices"] and conn.sock is sock
    conn.close()


def test_an_internal_error_is_a_json_500_and_the_connection_stays_usable(served, monkeypatch):
    bg, server = served
    conn = http.client.HTTPConnection("127.0.0.1", bg.port, timeout=60)
    conn.connect()
    sock = conn.sock
    monkeypatch.setattr(server, "prepare", lambda kind, raw: 1 / 0)  # a bug
    status, err = post(conn, "/v1/completions", {"model": "tiny", "prompt": "x"})
    assert status == 500 and err["error"]["type"] == "server_error" and "ZeroDivisionError" in err["error"]["message"]
    monkeypatch.undo()
    for _ in range(3):
        status, ok = post(conn, "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 2})
        assert status == 200 and conn.sock is sock
    # A bug while streaming (headers already sent) ends the stream with an in-band error and [DONE].
    real = server._chunks

    def broken(call):
        chunk, final, usage = real(call)
        return (lambda *a: 1 / 0), final, usage

    monkeypatch.setattr(server, "_chunks", broken)
    status, text = post(conn, "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 3, "stream": True})
    events = [e for e in text.split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["type"] == "server_error"
    monkeypatch.undo()
    status, ok = post(conn, "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 2})
    assert status == 200 and conn.sock is sock
    conn.close()


# ---- OpenAI features: include_usage, unsupported fields --------------------------------------------------------
@pytest.fixture(scope="module")
def client(served):
    import openai

    bg, _ = served
    return openai.OpenAI(base_url=bg.url, api_key="x", max_retries=0, timeout=60)


def test_stream_options_include_usage(client):
    chunks = list(client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None for c in body) and "".join(c.choices[0].text for c in body)
    plain = list(client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0, stream=True))
    assert plain[-1].choices and plain[-1].usage is None  # no usage chunk unless asked for

    msgs = [{"role": "user", "content": "say hello"}]
    chat = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    assert chat[-1].choices == [] and chat[-1].usage.model_dump() == full.usage.model_dump()


def test_unsupported_fields_are_named(client):
    import openai

    msgs = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, tools=[tool])
    assert e.value.body["param"] == "tools" and "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", extra_body={"repetition_penalty": 1.2})
    assert e.value.body["param"] == "repetition_penalty"


# ---- the API key -----------------------------------------------------------------------------------------------
def test_api_key(engine):
    import openai

    bg, server = serve(engine, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=bg.url, api_key="wrong", max_retries=0).models.list()
        assert e.value.body["code"] == "invalid_api_key"
        conn = http.client.HTTPConnection("127.0.0.1", bg.port, timeout=30)
        for headers in ({}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cret2"}):
            status, err = post(conn, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}, headers)
            assert status == 401 and err["error"]["code"] == "invalid_api_key", headers
        conn.request("GET", "/health")
        health = conn.getresponse()
        assert health.status == 200 and health.read()
        conn.request("GET", "/")
        page = conn.getresponse()
        assert page.status == 200 and b"api-key" in page.read()  # the page is open; it asks for the key
        good = openai.OpenAI(base_url=bg.url, api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["tiny"]
        assert good.completions.create(model="tiny", prompt="the", max_tokens=2).choices
        doc = server.app.openapi()  # the document says so, for clients and fuzzers
        assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert doc["paths"]["/v1/completions"]["post"]["security"] == [{"HTTPBearer": []}]
    finally:
        bg.__exit__(None)
        server.close()
