"""An OpenAI-compatible HTTP server for a model (FastAPI + uvicorn), with a chat page.

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions (logprobs, echo), POST /v1/chat/completions;
both POSTs stream with `"stream": true` as server-sent events in OpenAI's chunk format, ending in
`data: [DONE]` (`stream_options.include_usage` adds OpenAI's usage chunk). GET / is a chat page (static files
in serve/static, no external assets); GET /health answers without the model; /openapi.json describes it all
(serve/openapi.py).

Concurrency: HTTP handling is asyncio; the model runs on ONE worker thread (`Batcher`). The worker takes the
first waiting request, waits `batch_wait_ms` for more to arrive, and runs them all as one left-padded batch
(each row with its own sampling settings, see engine.py): N concurrent clients cost roughly one decode pass per
token instead of N. Requests arriving while a batch runs form the next batch. What a request costs before the
model (reading JSON, checking every field, rendering the chat template, tokenizing) runs on a small thread pool,
never on the event loop, and is bounded: bodies above `max_body_bytes` are a 413 before they are parsed, and a
prompt with more characters than the context could hold in tokens is a 400 before it is tokenized.

Hostile and careless clients: a request fails alone, whatever the cause (the batcher checks each request
before batching it and the engine isolates rows); a client that disconnects cancels its generation, which stops
at the next step and frees its row; every malformed request is a 4xx with OpenAI's body
`{"error": {"message", "type", "param", "code"}}` (404 for an unknown model, 413 for a large body, 401 for a
missing or wrong API key) and no error closes the connection; an unexpected failure is a 500 with the same
shape. Fields the server does not implement (`tools`, `logit_bias`, `n` > 1, ...) are a 400 naming the field,
never silently ignored. With `api_key`, every /v1 route needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import codecs
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request as HTTPRequest  # module level: FastAPI resolves handler annotations by name

from phiforge.lm.sampling import Sampling
from phiforge.serve import openapi
from phiforge.serve.chat import format_chat
from phiforge.serve.engine import Engine, Request, Result, TokenLogprob
from phiforge.serve.validate import (
    SEED_MAX,
    SEED_MIN,
    APIError,
    chat_messages,
    check_fields,
    int_field,
    number_field,
    parse_json,
    stop_strings,
    stream_usage,
    typed_field,
    unsupported_values,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("phiforge.serve")

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 4 << 20  # a 2048-token context needs ~10 KB of text; token-id batches need more
DRAIN_BYTES = 64 << 20  # a too-large body is read (and dropped) up to this much so the 413 reaches the client


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


def max_token_chars(tokenizer: Any) -> int | None:
    """The most characters one token can decode to (the longest vocabulary entry: byte-level and sentencepiece
    pieces are never shorter than their text), or None when the tokenizer does not show its vocabulary."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "get_vocab"):
        return None
    return max((len(t) for t in backend.get_vocab(with_added_tokens=True)), default=None)


# ---- the model worker ------------------------------------------------------------------------------------------
@dataclass
class _Job:
    requests: list[Request]
    on_text: Any  # (index within this job, text, TokenLogprob | None) -> None, called on the worker thread
    future: Future
    streamed: bool = False  # some text reached the client already


class JobCancelled(Exception):
    """The client went away before its request finished."""


def _settle(fut: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a job's future; one that the client cancelled meanwhile is left as it is."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


class Batcher:
    """One worker thread that runs queued jobs through the engine, batching whatever arrives together.

    `submit` returns a Future; cancelling it (the client disconnected) sets the job's cancel event, so the
    engine drops its rows at the next step. A job fails alone: its requests are checked before it joins a
    batch, the engine isolates rows, and when the batched model step itself fails each job that has not
    streamed anything yet is run again on its own."""

    def __init__(self, engine: Engine, max_batch: int = 64, batch_wait_ms: float = 5.0) -> None:
        self.engine, self.max_batch, self.batch_wait = engine, max_batch, batch_wait_ms / 1000
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.batches_run = 0
        self.largest_batch = 0
        self.cancelled = 0  # jobs whose client went away before they finished
        self.failed = 0  # jobs that failed in the worker
        self.thread = threading.Thread(target=self._loop, name="phiforge-model", daemon=True)
        self.thread.start()

    def submit(self, requests: list[Request], on_text: Any = None) -> Future:
        cancel = threading.Event()
        for r in requests:
            r.cancel = cancel
        fut: Future = Future()
        fut.add_done_callback(lambda f: cancel.set() if f.cancelled() else None)
        self.queue.put(_Job(requests, on_text, fut))
        return fut

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _admit(self, job: _Job) -> bool:
        """Whether `job` may join a batch: not cancelled, and every request one the engine can run."""
        if job.future.cancelled():
            self.cancelled += 1
            return False
        try:
            for r in job.requests:
                self.engine.validate(r)
        except Exception as e:  # noqa: BLE001 - this job's own failure
            self.failed += 1
            _settle(job.future, error=e)
            return False
        return True

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            jobs = [job] if self._admit(job) else []
            rows = sum(len(j.requests) for j in jobs)
            deadline = time.monotonic() + self.batch_wait
            while rows < self.max_batch:  # gather what arrives within the batching window
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # stop after this batch
                    break
                if self._admit(nxt):
                    jobs.append(nxt)
                    rows += len(nxt.requests)
            if not jobs:
                continue
            try:
                self._run(jobs)
            except BaseException as e:  # noqa: BLE001 - never let the worker die: fail what is left
                for j in jobs:
                    _settle(j.future, error=e if isinstance(e, Exception) else RuntimeError(repr(e)))

    def _run(self, jobs: list[_Job]) -> None:
        requests, owner = [], []  # owner[row] = (job, index within job)
        for job in jobs:
            for k, r in enumerate(job.requests):
                requests.append(r)
                owner.append((job, k))

        def on_text(row: int, text: str, info: TokenLogprob | None) -> None:
            job, k = owner[row]
            job.streamed = True
            if job.on_text is not None:
                job.on_text(k, text, info)

        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(requests))
        try:
            results = self.engine.run(requests, on_text, isolate=True)
        except Exception as e:  # noqa: BLE001 - the batched step failed: find whose request it was
            if len(jobs) == 1:
                self.failed += 1
                _settle(jobs[0].future, error=e)
                return
            for job in jobs:
                if job.streamed:  # half its text is out: it cannot start over
                    self.failed += 1
                    _settle(job.future, error=e)
                else:
                    self._run([job])
            return
        for job in jobs:
            mine: list[Result] = [results[i] for i, (j, _) in enumerate(owner) if j is job]
            error = next((r.error for r in mine if r.error is not None), None)
            if error is not None:
                self.failed += 1
                _settle(job.future, error=error)
            elif any(r.finish_reason == "cancelled" for r in mine):
                self.cancelled += 1
                _settle(job.future, error=JobCancelled())
            else:
                _settle(job.future, mine)


# ---- the server --------------------------------------------------------------------------------------------------
@dataclass
class _Call:
    """A checked, tokenized request: what the model runs and what the response needs."""

    kind: str  # "completion" or "chat"
    requests: list[Request]
    prompts: list[list[int]]
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # completions: top alternatives per token
    echo: bool = False
    chat_logprobs: bool = False
    strip_lead: bool = False  # Phi's "Output:" leaves a space before the answer: not part of the message


class Server:
    """The OpenAI API over one Engine. `app` is the FastAPI application.

    `api_key` (None: open) is required as `Authorization: Bearer` on every /v1 route; `max_body_bytes` bounds a
    request body (413 above it); `prep_threads` parse and tokenize requests off the event loop."""

    def __init__(self, engine: Engine, model_name: str, *, max_batch: int = 64, batch_wait_ms: float = 5.0,
                 api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 prep_threads: int = 2) -> None:
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.max_batch = max_batch
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.batcher = Batcher(engine, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
        self.prep = ThreadPoolExecutor(max_workers=prep_threads, thread_name_prefix="phiforge-prep")
        chars = max_token_chars(self.tokenizer)
        # 2x margin: a normalizer could merge characters; past this a prompt cannot fit the context anyway
        self.max_prompt_chars = 2 * chars * engine.context if chars else None
        self.created = int(time.time())
        self.streams_served = 0
        self.app = self._build_app()

    def close(self) -> None:
        self.batcher.close()
        self.prep.shutdown(wait=False, cancel_futures=True)

    # ---- preparing a request (on the prep threads) --------------------------------------------------------
    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "model: required (a model id from /v1/models)", param="model", code="missing")
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server has `{self.model_name}`)",
                           param="model", code="model_not_found")

    def _encode(self, text: str, field: str) -> list[int]:
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise APIError(400, f"This model's maximum context length is {self.engine.context} tokens; the "
                                f"{field} has {len(text)} characters, more than that many tokens can hold",
                           param=field, code="context_length_exceeded")
        return self.tokenizer.encode(text)

    def _request(self, body: dict[str, Any], prompt_ids: list[int], max_tokens_field: str = "max_tokens",
                 default_max: int = 16) -> Request:
        max_tokens = int_field(body, max_tokens_field, default_max, low=0)
        context = self.engine.context
        if len(prompt_ids) >= context:  # chat's default max_tokens fills what is left, which may be nothing
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                                f"{len(prompt_ids)}, which leaves no room for a completion",
                           param=max_tokens_field, code="context_length_exceeded")
        if len(prompt_ids) + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                                f"{len(prompt_ids)} and {max_tokens_field} asks for {max_tokens} more",
                           param=max_tokens_field, code="context_length_exceeded")
        top_k = int_field(body, "top_k", None, low=0)  # an extension, as in vLLM
        if top_k is not None:
            top_k = min(top_k, self.engine.vocab_size)  # more than the vocabulary keeps every token anyway
        temperature = number_field(body, "temperature", 1.0, low=0, high=2)
        top_p: float | None = number_field(body, "top_p", 1.0, low=0, high=1)
        if top_p == 0:  # top_p 0: only the most likely token
            top_p = None if temperature == 0 else 1e-9
        seed = int_field(body, "seed", None, low=SEED_MIN, high=SEED_MAX)
        req = Request(prompt_ids, Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                           max_new_tokens=max_tokens, stop=stop_strings(body)),
                      ignore_eos=bool(typed_field(body, "ignore_eos", bool, False)))
        try:
            self.engine.validate(req)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":")[0], code="invalid_value") from None
        return req

    def _prompts(self, body: dict[str, Any]) -> list[list[int]]:
        if body.get("prompt") is None:
            raise APIError(400, "prompt: required", param="prompt", code="missing")
        p = body["prompt"]

        def ids(x: Any) -> bool:  # integers as JSON Schema has them: 3.0 is one
            return isinstance(x, list) and bool(x) and all(
                isinstance(t, int) and not isinstance(t, bool) or isinstance(t, float) and t.is_integer() for t in x)

        if isinstance(p, str):
            prompts = [p]
        elif ids(p):
            prompts = [[int(t) for t in p]]  # one prompt as token ids
        elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            prompts = p  # several prompts
        elif isinstance(p, list) and p and all(ids(x) for x in p):
            prompts = [[int(t) for t in x] for x in p]  # several prompts as token ids
        else:
            raise APIError(400, "prompt: expected a string, a list of strings, a list of token ids or a list of "
                                "such lists (non-empty)", param="prompt", code="invalid_type")
        if len(prompts) > self.max_batch:
            raise APIError(400, f"prompt: at most {self.max_batch} prompts per request, got {len(prompts)}",
                           param="prompt", code="invalid_value")
        vocab = self.engine.vocab_size
        out = []
        for x in prompts:
            if isinstance(x, list) and len(x) >= self.engine.context:
                raise APIError(400, f"This model's maximum context length is {self.engine.context} tokens; a "
                                    f"prompt has {len(x)}", param="prompt", code="context_length_exceeded")
            toks = self._encode(x, "prompt") if isinstance(x, str) else list(x)
            if any(not 0 <= t < vocab for t in toks):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt",
                               code="invalid_value")
            out.append(toks or [self.engine.eos])  # an empty string: start from end-of-text, a document boundary
        return out

    def prepare(self, kind: str, raw: bytes) -> _Call:
        """Parse and check a request body and tokenize its prompt(s): every error is an APIError."""
        body = parse_json(raw)
        check_fields(body, kind)
        self._check_model(body)
        unsupported_values(body)
        stream = bool(typed_field(body, "stream", bool, False))
        usage = stream_usage(body, stream)
        if kind == "completion":
            prompts = self._prompts(body)
            logprobs = int_field(body, "logprobs", None, low=0, high=openapi.MAX_TOP_LOGPROBS)
            echo = bool(typed_field(body, "echo", bool, False))
            if echo and stream:
                raise APIError(400, "echo: not supported together with stream", param="echo",
                               code="unsupported_value")
            requests = []
            for ids in prompts:
                req = self._request(body, ids)
                req.logprobs, req.echo_logprobs = logprobs, echo and logprobs is not None
                requests.append(req)
            return _Call(kind, requests, prompts, stream, usage, logprobs=logprobs, echo=echo)
        messages = chat_messages(body.get("messages"))
        want_lp = bool(typed_field(body, "logprobs", bool, False))
        top = int_field(body, "top_logprobs", None, low=0, high=openapi.MAX_TOP_LOGPROBS)
        if top is not None and not want_lp:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs", code="invalid_value")
        try:
            prompt, stops = format_chat(self.tokenizer, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        ids = self._encode(prompt, "messages")
        field_ = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        int_field(body, "max_tokens", low=0, high=self.engine.context - 1)  # checked even where the other one wins
        req = self._request(body, ids, field_, default_max=max(0, min(256, self.engine.context - len(ids))))
        req.sampling = replace(req.sampling, stop=req.sampling.stop + tuple(stops))
        req.logprobs = (top or 0) if want_lp else None
        return _Call(kind, [req], [ids], stream, usage, chat_logprobs=want_lp,
                     strip_lead=not getattr(self.tokenizer, "chat_template", None))

    # ---- token text ---------------------------------------------------------------------------------------
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
        """OpenAI's completions logprobs; text_offset counts the characters completed before each token (an
        incremental UTF-8 decode: linear in the tokens, where decoding every prefix would be quadratic)."""
        infos = [i for i in infos if i is not None]
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        for info in infos:
            out["tokens"].append(self._token_text(info.token_id))
            out["token_logprobs"].append(info.logprob)
            out["top_logprobs"].append({self._token_text(t): lp for t, lp in info.top})
            out["text_offset"].append(offset)
            offset += len(utf8.decode(self._token_bytes(info.token_id)))
        return out

    def _chat_logprobs(self, infos: list[TokenLogprob | None]) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            text = self._token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(self._token_bytes(t))}

        return {"content": [{**entry(i.token_id, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
                            for i in infos if i is not None]}

    # ---- responses ------------------------------------------------------------------------------------------
    @staticmethod
    def _usage(call: _Call, results: list[Result]) -> dict[str, int]:
        n_prompt = sum(len(p) for p in call.prompts)
        n_out = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def _head(self, call: _Call) -> dict[str, Any]:
        prefix = "cmpl" if call.kind == "completion" else "chatcmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}

    def _completion_body(self, call: _Call, results: list[Result]) -> dict[str, Any]:
        choices = []
        for k, res in enumerate(results):
            ids = call.prompts[k]
            text = (self.tokenizer.decode(ids) if call.echo else "") + res.text
            lp = None
            if call.logprobs is not None:
                infos = (res.prompt_logprobs if call.echo else []) + res.logprobs
                if call.echo:  # the first prompt token has no logprob: report it with None
                    lp = self._completion_logprobs(infos[1:], len(self.tokenizer.decode([ids[0]])))
                    lp["tokens"].insert(0, self._token_text(ids[0]))
                    lp["token_logprobs"].insert(0, None)
                    lp["top_logprobs"].insert(0, None)
                    lp["text_offset"].insert(0, 0)
                else:
                    lp = self._completion_logprobs(infos, 0)
            choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": res.finish_reason})
        return {**self._head(call), "object": "text_completion", "choices": choices,
                "usage": self._usage(call, results)}

    def _chat_body(self, call: _Call, results: list[Result]) -> dict[str, Any]:
        (res,) = results
        text = res.text.lstrip() if call.strip_lead else res.text
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": self._chat_logprobs(res.logprobs) if call.chat_logprobs else None,
                  "finish_reason": res.finish_reason}
        return {**self._head(call), "object": "chat.completion", "choices": [choice],
                "usage": self._usage(call, results)}

    def _chunks(self, call: _Call) -> tuple[Any, Any, Any]:
        """(chunk(index, text, info) -> dict | None per token, final(index, result) -> dict per choice,
        usage(results) -> dict) for a streamed call, in OpenAI's chunk format."""
        head = self._head(call)
        usage = {"usage": None} if call.include_usage else {}  # with include_usage every chunk has the key
        if call.kind == "completion":
            head["object"] = "text_completion"
            offsets = [0] * len(call.requests)

            def chunk(k: int, text: str, info: TokenLogprob | None) -> dict[str, Any] | None:
                if not text and (info is None or call.logprobs is None):
                    return None
                lp = self._completion_logprobs([info], offsets[k]) if call.logprobs is not None else None
                offsets[k] += len(text)
                return {**head, "choices": [{"index": k, "text": text, "logprobs": lp, "finish_reason": None}],
                        **usage}

            def final(k: int, res: Result) -> dict[str, Any]:
                return {**head, "choices": [{"index": k, "text": "", "logprobs": None,
                                             "finish_reason": res.finish_reason}], **usage}
        else:
            head["object"] = "chat.completion.chunk"
            started, lead = [False], [call.strip_lead]

            def chunk(k: int, text: str, info: TokenLogprob | None) -> dict[str, Any] | None:
                delta: dict[str, Any] = {}
                if not started[0]:
                    delta["role"], started[0] = "assistant", True
                if lead[0]:
                    text = text.lstrip()
                    lead[0] = not text
                if text or "role" in delta:
                    delta["content"] = text
                lp = self._chat_logprobs([info]) if call.chat_logprobs and info is not None else None
                if not delta and lp is None:
                    return None
                return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}],
                        **usage}

            def final(k: int, res: Result) -> dict[str, Any]:
                return {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                             "finish_reason": res.finish_reason}], **usage}

        def usage_chunk(results: list[Result]) -> dict[str, Any]:
            return {**head, "choices": [], "usage": self._usage(call, results)}

        return chunk, final, usage_chunk

    def _stream(self, call: _Call) -> Any:
        """An SSE response; the client going away (the body generator is closed) cancels the generation."""
        from fastapi.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        chunk, final, usage_chunk = self._chunks(call)

        def on_text(k: int, text: str, info: TokenLogprob | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("token", k, text, info))

        fut = self.batcher.submit(call.requests, on_text)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", f)))
        self.streams_served += 1

        async def body() -> Any:
            try:
                while True:
                    ev = await events.get()
                    if ev[0] == "token":
                        c = chunk(ev[1], ev[2], ev[3])
                        if c is not None:
                            yield f"data: {json.dumps(c)}\n\n"
                        continue
                    f = ev[1]
                    if f.cancelled():
                        return
                    if f.exception() is not None:  # headers are sent already: report in-band, as OpenAI does
                        yield f"data: {json.dumps(self._failure(f.exception()).body())}\n\n"
                    else:
                        results = f.result()
                        for k, res in enumerate(results):
                            yield f"data: {json.dumps(final(k, res))}\n\n"
                        if call.include_usage:
                            yield f"data: {json.dumps(usage_chunk(results))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            except Exception as e:  # noqa: BLE001 - a bug making a chunk: end the stream properly, in-band
                log.exception("internal error while streaming")
                err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
                yield f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n"
            finally:
                fut.cancel()  # a no-op once it finished; otherwise the client left: stop generating

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    def _failure(e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, ValueError):  # the engine's own request checks
            return APIError(400, str(e), code="invalid_value")
        return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")

    async def _complete(self, call: _Call, request: HTTPRequest) -> Any:
        """Run a call to the end; the client disconnecting meanwhile cancels it."""
        from fastapi.responses import JSONResponse, Response

        fut = self.batcher.submit(call.requests)
        done = asyncio.wrap_future(fut)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():  # the client left: nobody reads the answer
                fut.cancel()
                return Response(status_code=499)
            try:
                results = done.result()
            except Exception as e:  # noqa: BLE001 - reported to this client only
                err = self._failure(e)
                return JSONResponse(err.body(), status_code=err.status)
        finally:
            gone.cancel()
            fut.cancel()
        # decoding logprobs' tokens and serializing can take a while (64 prompts x 20 alternatives): off the loop too
        build = self._completion_body if call.kind == "completion" else self._chat_body
        content = await asyncio.get_running_loop().run_in_executor(
            self.prep, lambda: json.dumps(build(call, results)).encode())
        return Response(content, media_type="application/json")

    async def handle(self, kind: str, request: HTTPRequest) -> Any:
        """One generation request: read, check and tokenize it off the event loop, then stream or complete it.
        Every failure becomes a JSON error response here, so none reaches uvicorn (which would close the
        connection)."""
        from fastapi.responses import JSONResponse, Response
        from starlette.requests import ClientDisconnect

        try:
            raw = await self._read_body(request)
            call = await asyncio.get_running_loop().run_in_executor(self.prep, self.prepare, kind, raw)
            if call.stream:
                return self._stream(call)
            return await self._complete(call, request)
        except APIError as e:
            return e.response()
        except ClientDisconnect:  # it left while sending its request: nothing to answer
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - a bug, reported as a 500 on a connection that stays usable
            log.exception("internal error")
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            return JSONResponse(err.body(), status_code=500)

    async def _read_body(self, request: HTTPRequest) -> bytes:
        """The body, at most max_body_bytes; a larger one is a 413 (read and dropped up to DRAIN_BYTES first, so
        the client, still sending, gets the answer rather than a reset)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        size, chunks = 0, []
        too_big = declared.isdigit() and int(declared) > limit
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_big = True
            if too_big:
                if size > DRAIN_BYTES:
                    break
                continue
            chunks.append(chunk)
        if too_big:
            raise APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                                f"(phiforge serve --max-body-mb)", code="request_too_large",
                           headers={"Connection": "close"} if size > DRAIN_BYTES else None)
        return b"".join(chunks)

    # ---- endpoints ----------------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "phiforge"}

    def _authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header `Authorization: Bearer <key>` "
                                "with the key the server was started with", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # ---- the app ------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        from fastapi import APIRouter, Depends, FastAPI
        from fastapi.exceptions import RequestValidationError
        from fastapi.openapi.utils import get_openapi
        from fastapi.responses import FileResponse, JSONResponse
        from fastapi.security import HTTPBearer
        from starlette.exceptions import HTTPException as StarletteHTTPException

        app = FastAPI(title="phiforge", description="OpenAI-compatible API for a language model, and a chat page",
                      version="1")
        errors = (400, 401, 404, 413, 500) if self.api_key else (400, 404, 413, 500)
        auth_errors = (401,) if self.api_key else ()
        bearer = HTTPBearer(auto_error=False, description="the key `phiforge serve --api-key` was started with")

        # HTTPBearer only puts the scheme in the OpenAPI document; the check is _authorize's (constant time)
        async def authorize(request: HTTPRequest, _: Any = Depends(bearer)) -> None:  # noqa: B008
            self._authorize(request)

        v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)] if self.api_key else [])

        @app.exception_handler(APIError)
        async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
            return e.response()

        @app.exception_handler(RequestValidationError)
        async def validation_error(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
            errs = e.errors()
            param = ".".join(str(x) for x in errs[0]["loc"][1:]) if errs else None
            msg = "; ".join(f"{'.'.join(str(x) for x in d['loc'])}: {d['msg']}" for d in errs) or "invalid request"
            return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
            return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code,
                                headers=getattr(e, "headers", None))

        @v1.get("/models", responses=openapi.responses("ModelList", errors=auth_errors))
        async def list_models() -> Any:
            return JSONResponse(self.models())

        @v1.get("/models/{model_id:path}", responses=openapi.responses("Model", errors=(404, *auth_errors)))
        async def get_model(model_id: str) -> Any:
            if model_id != self.model_name:
                raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
            return JSONResponse(self.model_card())

        @v1.post("/completions", openapi_extra=openapi.json_body("CompletionRequest"),
                 responses=openapi.responses("Completion", stream="CompletionChunk", errors=errors))
        async def completions(request: HTTPRequest) -> Any:
            return await self.handle("completion", request)

        @v1.post("/chat/completions", openapi_extra=openapi.json_body("ChatCompletionRequest"),
                 responses=openapi.responses("ChatCompletion", stream="ChatCompletionChunk",
                                             errors=errors))
        async def chat_completions(request: HTTPRequest) -> Any:
            return await self.handle("chat", request)

        app.include_router(v1)

        @app.get("/health", responses=openapi.responses("Health"))
        async def health() -> Any:
            return JSONResponse({"status": "ok", "backend": self.engine.backend,
                                 "batches": self.batcher.batches_run, "largest_batch": self.batcher.largest_batch,
                                 "queued": self.batcher.queue.qsize(), "cancelled": self.batcher.cancelled,
                                 "failed": self.batcher.failed})

        @app.get("/", include_in_schema=False)
        async def chat_page() -> Any:
            return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

        @app.get("/static/{name}", include_in_schema=False)
        async def static(name: str) -> Any:
            path = STATIC / name
            if "/" in name or name.startswith(".") or not path.is_file():
                raise APIError(404, f"no such file: {name}", code="not_found")
            return FileResponse(path, headers={"Cache-Control": "no-cache"})

        def schema() -> dict[str, Any]:
            if app.openapi_schema is None:
                doc = get_openapi(title=app.title, version=app.version, description=app.description,
                                  routes=app.routes)
                doc.setdefault("components", {}).setdefault("schemas", {}).update(openapi.schemas(
                    self.model_name, context=self.engine.context, vocab=self.engine.vocab_size,
                    max_batch=self.max_batch))
                app.openapi_schema = doc
            return app.openapi_schema

        app.openapi = schema  # type: ignore[method-assign]
        return app


async def _disconnected(request: HTTPRequest) -> None:
    """Return once the client has disconnected (the body was read already, so the next message says so)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---- running ---------------------------------------------------------------------------------------------------
def bind_socket(host: str, port: int) -> Any:
    """A listening TCP socket on host:port (port 0: the OS picks one). A busy port or an address this machine
    does not have is a ConfigError naming it."""
    import socket

    from phiforge.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = "pick another --port or stop the program using it" if e.errno == 98 else "check --host and --port"
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from None
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """uvicorn serving `app` on a thread (tests, benchmarks). `url` is the base URL, e.g. http://127.0.0.1:PORT/v1."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = bind_socket(host, port)
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
