"""An OpenAI-compatible HTTP server for a Phi checkpoint (FastAPI + uvicorn).

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions (logprobs, echo), POST /v1/chat/completions;
both POSTs stream with `"stream": true` as server-sent events in OpenAI's chunk format, ending in
`data: [DONE]`.

Concurrency: HTTP handling is asyncio; the model runs on ONE worker thread (`Batcher`). The worker takes the
first waiting request, waits `batch_wait_ms` for more to arrive, and runs them all as one left-padded batch
(each row with its own sampling settings, see engine.py): N concurrent clients cost roughly one decode pass per
token instead of N. Requests arriving while a batch runs form the next batch.

Errors: anything wrong with a request is a 4xx with OpenAI's body
`{"error": {"message", "type": "invalid_request_error", "param", "code"}}` (FastAPI's own 422 validation
responses are rewritten to that shape with status 400); an unknown model is 404; an unexpected failure is a
500 with the same shape. The server never dies because of a request.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fastapi import Request as HTTPRequest  # module level: FastAPI resolves handler annotations by name

from phiforge.lm.sampling import Sampling
from phiforge.serve.chat import format_chat
from phiforge.serve.engine import Engine, Request, TokenLogprob

if TYPE_CHECKING:
    from fastapi import FastAPI


class APIError(Exception):
    """A request error reported to the client in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # control characters and space map to 256 + n
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_alphabet()


# ---- the model worker ------------------------------------------------------------------------------------------
@dataclass
class _Job:
    requests: list[Request]
    on_text: Any  # (index within this job, text, TokenLogprob | None) -> None, called on the worker thread
    future: Future


class Batcher:
    """One worker thread that runs queued jobs through the engine, batching whatever arrives together."""

    def __init__(self, engine: Engine, max_batch: int = 64, batch_wait_ms: float = 5.0) -> None:
        self.engine, self.max_batch, self.batch_wait = engine, max_batch, batch_wait_ms / 1000
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.batches_run = 0
        self.largest_batch = 0
        self.thread = threading.Thread(target=self._loop, name="phiforge-model", daemon=True)
        self.thread.start()

    def submit(self, requests: list[Request], on_text: Any = None) -> Future:
        fut: Future = Future()
        self.queue.put(_Job(requests, on_text, fut))
        return fut

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            jobs = [job]
            rows = len(job.requests)
            deadline = time.monotonic() + self.batch_wait
            while rows < self.max_batch:  # gather what arrives within the batching window
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
                rows += len(nxt.requests)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        requests, owner = [], []  # owner[row] = (job, index within job)
        for job in jobs:
            for k, r in enumerate(job.requests):
                requests.append(r)
                owner.append((job, k))

        def on_text(row: int, text: str, info: TokenLogprob | None) -> None:
            job, k = owner[row]
            if job.on_text is not None:
                job.on_text(k, text, info)

        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(requests))
        try:
            results = self.engine.run(requests, on_text)
        except Exception as e:  # noqa: BLE001 - reported to every client of the batch, the worker lives on
            for job in jobs:
                job.future.set_exception(e)
            return
        for job in jobs:
            job.future.set_result([results[i] for i, (j, _) in enumerate(owner) if j is job])


# ---- request parsing -------------------------------------------------------------------------------------------
def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = None, *,
           low: float | None = None, high: float | None = None) -> Any:
    """body[name] checked for type and range; APIError(400) naming the field otherwise."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise APIError(400, f"{name}: expected {names}, got {type(value).__name__}", param=name,
                       code="invalid_type")
    if low is not None and value < low or high is not None and value > high:
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise APIError(400, f"{name}: {value!r} is out of range (must be {rng})", param=name,
                       code="invalid_value")
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "stop: expected a non-empty string or a list of up to 4 of them", param="stop")
    return stop


def _unsupported(body: dict[str, Any]) -> None:
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise APIError(400, "n: only n=1 is supported", param="n", code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, (int, float), 0) != 0:
            raise APIError(400, f"{name}: not supported (must be 0)", param=name, code="unsupported_value")
    if body.get("best_of") not in (None, 1):
        raise APIError(400, "best_of: only 1 is supported", param="best_of", code="unsupported_value")
    if body.get("suffix"):
        raise APIError(400, "suffix: not supported", param="suffix", code="unsupported_value")


class Server:
    """The OpenAI API over one Engine. `app` is the FastAPI application."""

    def __init__(self, engine: Engine, model_name: str, *, max_batch: int = 64, batch_wait_ms: float = 5.0) -> None:
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.batcher = Batcher(engine, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
        self.created = int(time.time())
        self.app = self._build_app()

    # ---- helpers ------------------------------------------------------------------------------------------
    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "model: required (a model id from /v1/models)", param="model", code="missing")
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server has `{self.model_name}`)",
                           param="model", code="model_not_found")

    def _sampling(self, body: dict[str, Any], prompt_ids: list[int], max_tokens_field: str = "max_tokens",
                  default_max: int = 16) -> Request:
        max_tokens = _field(body, max_tokens_field, (int,), default_max, low=0)
        context = self.engine.context
        if len(prompt_ids) + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                                f"{len(prompt_ids)} and {max_tokens_field} asks for {max_tokens} more",
                           param=max_tokens_field, code="context_length_exceeded")
        top_k = _field(body, "top_k", (int,), None, low=0)  # an extension, as in vLLM
        temperature = float(_field(body, "temperature", (int, float), 1.0, low=0, high=2))
        top_p: float | None = float(_field(body, "top_p", (int, float), 1.0, low=0, high=1))
        if top_p == 0:  # top_p 0: only the most likely token
            top_p = None if temperature == 0 else 1e-9
        req = Request(prompt_ids, Sampling(temperature=temperature, top_p=top_p, top_k=top_k,
                                           seed=_field(body, "seed", (int,), None), max_new_tokens=max_tokens,
                                           stop=_stops(body)))
        try:
            self.engine.validate(req)
        except ValueError as e:
            field = str(e).split(":")[0]
            raise APIError(400, str(e), param=field) from None
        return req

    def _token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (byte-level BPE pieces map back through GPT-2's byte alphabet)."""
        piece = self.tokenizer.id_to_token(token_id) or ""
        if piece and all(c in _BYTE_DECODER for c in piece):
            return bytes(_BYTE_DECODER[c] for c in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")  # added tokens (whitespace runs, specials)

    def _token_text(self, token_id: int) -> str:
        """A token as text; a token holding part of a UTF-8 character becomes "bytes:\\xNN..." (as OpenAI's API),
        so distinct tokens never collide as U+FFFD in top_logprobs."""
        b = self._token_bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)

    def _completion_logprobs(self, infos: list[TokenLogprob | None], offset: int) -> dict[str, Any]:
        """OpenAI's completions logprobs; text_offset counts characters of the decoded text before each token."""
        infos = [i for i in infos if i is not None]
        ids = [i.token_id for i in infos]
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for j, info in enumerate(infos):
            out["tokens"].append(self._token_text(info.token_id))
            out["token_logprobs"].append(info.logprob)
            out["top_logprobs"].append({self._token_text(t): lp for t, lp in info.top})
            out["text_offset"].append(offset + len(self.tokenizer.decode(ids[:j])) if j else offset)
        return out

    def _chat_logprobs(self, infos: list[TokenLogprob | None]) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            text = self._token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(self._token_bytes(t))}

        return {"content": [{**entry(i.token_id, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
                            for i in infos if i is not None]}

    async def _run(self, requests: list[Request], on_text: Any = None) -> list[Any]:
        try:
            return await asyncio.wrap_future(self.batcher.submit(requests, on_text))
        except ValueError as e:  # the engine's own request checks
            raise APIError(400, str(e)) from None

    def _stream(self, requests: list[Request], make_chunk: Any, make_final: Any) -> Any:
        """An SSE response: make_chunk(index, text, info) -> dict|None per token, make_final(index, result) -> dict
        once each choice ends, then [DONE]."""
        from fastapi.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_text(k: int, text: str, info: TokenLogprob | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("token", k, text, info))

        fut = self.batcher.submit(requests, on_text)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", f)))

        async def body() -> Any:
            while True:
                ev = await events.get()
                if ev[0] == "token":
                    chunk = make_chunk(ev[1], ev[2], ev[3])
                    if chunk is not None:
                        yield f"data: {json.dumps(chunk)}\n\n"
                    continue
                f = ev[1]
                if f.exception() is not None:  # headers are sent already: report in-band, as OpenAI does
                    err = APIError(500, f"generation failed: {f.exception()}", type="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                else:
                    for k, res in enumerate(f.result()):
                        yield f"data: {json.dumps(make_final(k, res))}\n\n"
                yield "data: [DONE]\n\n"
                return

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- endpoints ----------------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "phiforge"}

    def _prompts(self, body: dict[str, Any]) -> list[list[int]]:
        if "prompt" not in body or body["prompt"] is None:
            raise APIError(400, "prompt: required", param="prompt", code="missing")
        p = body["prompt"]
        vocab = self.engine.model.config.vocab_size
        if isinstance(p, str):
            prompts = [p]
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            prompts = [p]  # one prompt as token ids
        elif isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(
                isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
                for x in p)):
            prompts = p  # several prompts, as strings or as token id lists
        else:
            raise APIError(400, "prompt: expected a string, a list of strings, a list of token ids or a list of "
                                "such lists (non-empty)", param="prompt", code="invalid_type")
        out = []
        for x in prompts:
            ids = self.tokenizer.encode(x) if isinstance(x, str) else list(x)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            if not ids:  # an empty string: start from <|endoftext|>, as a document boundary
                ids = [self.engine.eos]
            out.append(ids)
        return out

    async def completions(self, body: dict[str, Any]) -> Any:
        self._check_model(body)
        _unsupported(body)
        prompts = self._prompts(body)
        logprobs = _field(body, "logprobs", (int,), None, low=0, high=20)
        echo = bool(_field(body, "echo", (bool,), False))
        stream = bool(_field(body, "stream", (bool,), False))
        if echo and stream:
            raise APIError(400, "echo: not supported together with stream", param="echo")
        requests = []
        for ids in prompts:
            req = self._sampling(body, ids)
            req.logprobs, req.echo_logprobs = logprobs, echo and logprobs is not None
            requests.append(req)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        prompt_texts = [self.tokenizer.decode(ids) for ids in prompts]

        if stream:
            offsets = [0] * len(requests)

            def chunk(k: int, text: str, info: TokenLogprob | None) -> dict[str, Any] | None:
                if not text and (info is None or logprobs is None):
                    return None
                lp = self._completion_logprobs([info], offsets[k]) if logprobs is not None else None
                offsets[k] += len(text)
                return {**base, "choices": [{"index": k, "text": text, "logprobs": lp, "finish_reason": None}]}

            def final(k: int, res: Any) -> dict[str, Any]:
                return {**base, "choices": [{"index": k, "text": "", "logprobs": None,
                                             "finish_reason": res.finish_reason}]}

            return self._stream(requests, chunk, final)

        results = await self._run(requests)
        choices = []
        for k, res in enumerate(results):
            text = (prompt_texts[k] if echo else "") + res.text
            lp = None
            if logprobs is not None:
                infos = (res.prompt_logprobs if echo else []) + res.logprobs
                if echo:  # the first prompt token has no logprob: report it with None
                    first = prompts[k][0]
                    lp = self._completion_logprobs(infos[1:], len(self.tokenizer.decode([first])))
                    lp["tokens"].insert(0, self._token_text(first))
                    lp["token_logprobs"].insert(0, None)
                    lp["top_logprobs"].insert(0, None)
                    lp["text_offset"].insert(0, 0)
                else:
                    lp = self._completion_logprobs(infos, 0)
            choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": res.finish_reason})
        n_prompt = sum(len(p) for p in prompts)
        n_out = sum(len(r.token_ids) for r in results)
        return {**base, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}

    async def chat_completions(self, body: dict[str, Any]) -> Any:
        self._check_model(body)
        _unsupported(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages: required (a non-empty list of {role, content})", param="messages",
                           code="missing" if messages is None else "invalid_type")
        try:
            prompt, stops = format_chat(self.tokenizer, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = self.tokenizer.encode(prompt)
        field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        req = self._sampling(body, ids, field, default_max=min(256, self.engine.context - len(ids)))
        req.sampling = replace(req.sampling, stop=req.sampling.stop + tuple(stops))
        want_lp = bool(_field(body, "logprobs", (bool,), False))
        top = _field(body, "top_logprobs", (int,), 0, low=0, high=20)
        req.logprobs = top if want_lp else None
        stream = bool(_field(body, "stream", (bool,), False))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": self.model_name}

        # Phi's "Output:" format leaves a space (or newline) before the answer: not part of the message.
        strip_lead = not getattr(self.tokenizer, "chat_template", None)
        if stream:
            started, lead = [False], [strip_lead]

            def chunk(k: int, text: str, info: TokenLogprob | None) -> dict[str, Any] | None:
                delta: dict[str, Any] = {}
                if not started[0]:
                    delta["role"], started[0] = "assistant", True
                if lead[0]:
                    text = text.lstrip()
                    lead[0] = not text
                if text or "role" in delta:
                    delta["content"] = text
                lp = self._chat_logprobs([info]) if want_lp and info is not None else None
                if not delta and lp is None:
                    return None
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}]}

            def final(k: int, res: Any) -> dict[str, Any]:
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": res.finish_reason}]}

            return self._stream([req], chunk, final)

        (res,) = await self._run([req])
        text = res.text.lstrip() if strip_lead else res.text
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": self._chat_logprobs(res.logprobs) if want_lp else None,
                  "finish_reason": res.finish_reason}
        n_out = len(res.token_ids)
        return {**base, "object": "chat.completion", "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}}

    # ---- the app ------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        from fastapi import FastAPI
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException

        app = FastAPI(title="phiforge", description="OpenAI-compatible API for a Phi model")

        @app.exception_handler(APIError)
        async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def validation_error(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
            errs = e.errors()
            param = ".".join(str(x) for x in errs[0]["loc"][1:]) if errs else None
            msg = "; ".join(f"{'.'.join(str(x) for x in d['loc'])}: {d['msg']}" for d in errs) or "invalid request"
            return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
            code = "not_found" if e.status_code == 404 else None
            return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

        @app.exception_handler(Exception)
        async def server_error(_: HTTPRequest, e: Exception) -> JSONResponse:
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            return JSONResponse(err.body(), status_code=500)

        async def json_body(request: HTTPRequest) -> dict[str, Any]:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"request body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise APIError(400, "request body must be a JSON object")
            return body

        @app.get("/v1/models")
        async def list_models() -> dict[str, Any]:
            return self.models()

        @app.get("/v1/models/{model_id:path}")
        async def get_model(model_id: str) -> dict[str, Any]:
            if model_id != self.model_name:
                raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
            return self.model_card()

        @app.post("/v1/completions")
        async def completions(request: HTTPRequest) -> Any:
            return await self.completions(await json_body(request))

        @app.post("/v1/chat/completions")
        async def chat_completions(request: HTTPRequest) -> Any:
            return await self.chat_completions(await json_body(request))

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {"status": "ok", "batches": self.batcher.batches_run, "largest_batch": self.batcher.largest_batch}

        return app


# ---- running ---------------------------------------------------------------------------------------------------
class BackgroundServer:
    """uvicorn serving `app` on a thread (tests, benchmarks). `url` is the base URL, e.g. http://127.0.0.1:PORT/v1."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # port 0: the OS picks a free one
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=30, backlog=2048)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
