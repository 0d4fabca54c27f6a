"""The OpenAI-compatible backend: any endpoint (vLLM, llama.cpp server, Ollama, `phiforge serve`, OpenAI) through
the `openai` client.

Generation sends one request per prompt, at most `concurrency` in flight, to `/completions` (or, with `chat`, to
`/chat/completions` as one user turn after an optional `system` message; `stream` reads server-sent events).
Log-likelihood asks `/completions` for the prompt's own token logprobs (`echo=true, logprobs=1, max_tokens=0`)
and sums those of the tokens that start at or after the end of the context, split as the native backends and
lm-eval split it: the context's trailing whitespace belongs to the continuation (" yes" after "Answer: " is one
token that starts inside the context as written). The endpoint gives its first prompt token no logprob, so a
rolling text or an empty context is scored from `bos_text` when it is given (the text the server's tokenizer
reads as its start-of-text token, e.g. "<|endoftext|>" for `phiforge serve`), as the native backends score it
from that token; without it their first token is not scored. Servers that do not return prompt logprobs raise a
clear error.

Reliability and cost live here, for every caller (eval and synthesis teachers alike). The client's own retries
are off (max_retries=0): timeouts, connection errors, 429/5xx, truncated or malformed bodies and streams that
stall or end early are retried up to `max_retries` times with exponential backoff (`backoff` * 2**attempt,
capped at `max_backoff`, with jitter, and never sooner than a `Retry-After` the server sent, up to
`max_retry_after`); each request has `timeout` seconds (a stream also a total deadline of the same length per
max_new_tokens / 16 tokens, so a trickling stream ends). A prompt the server refuses as such (HTTP 400, 413, 422:
too long, against a policy) does not stop the others: generation ends with `PromptRejected`, carrying the
finished completions and the server's reason per refused prompt; any other 4xx (auth, unknown model) is an
`EndpointError` at once.

Cost = tokens / 1000 * price; a request that could take the total over `budget` (its prompt estimate plus its
whole max_new_tokens) is not sent, and generation raises `BudgetExceeded` carrying the completions that did
finish. With a `ledger` file (`SpendLedger`) the budget is that of everything the file has recorded, across
processes and kills: each request is written there before it is sent and again when it returns.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from phiforge.errors import DataError, PhiforgeError
from phiforge.lm.base import LM, BudgetExceeded, GenRequest, Usage
from phiforge.lm.sampling import Sampling, cut_at_stop

T = TypeVar("T")


class EndpointError(PhiforgeError):
    """A request the server refused (4xx), or one that still failed after every retry."""


class PromptRejected(EndpointError):
    """The server refused some prompts themselves (HTTP 400, 413, 422). `partial` holds the completions that
    finished (None elsewhere), `rejected` the server's reason per refused request index; `budget_message` says
    whether the budget also stopped some requests (None: it did not)."""

    def __init__(self, message: str, partial: list[str | None], rejected: dict[int, str],
                 budget_message: str | None = None) -> None:
        super().__init__(message)
        self.partial, self.rejected, self.budget_message = partial, rejected, budget_message


class _Retryable(Exception):
    """A response we do not trust (malformed, truncated, stalled): ask again."""


REJECTING_STATUS = (400, 413, 422)  # the prompt itself is wrong for the server: skip it, keep the others


class SpendLedger:
    """What an endpoint has cost, as an append-only JSONL file that outlives the process.

    Each request is written as reserved (its worst-case cost) before it is sent and as settled (its real cost
    and tokens) when it returns, each line flushed and fsynced. The total counts every settled request and,
    for one reserved but never settled (the process was killed with it in flight), its reservation: money
    that may have been spent is never forgotten. A line cut by a kill is dropped on open."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._session = secrets.token_hex(4)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._cut_torn_line()
        self.spent = self._read()  # everything before this process, unsettled reservations included

    def _cut_torn_line(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())

    def _read(self) -> Usage:
        from phiforge.readers import iter_jsonl

        total, reserved = Usage(), {}
        if not self.path.exists():
            return total
        for n, rec, reason in iter_jsonl(self.path):
            if reason is not None or not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                raise DataError(f"{self.path}:{n}: damaged spending ledger ({reason or 'not a ledger record'}); "
                                f"it is what keeps the budget across runs: repair the line, or delete the file to "
                                f"start the count from zero")
            try:
                if "reserve" in rec:
                    reserved[rec["id"]] = float(rec["reserve"])
                    continue
                reserved.pop(rec["id"], None)
                total.requests += int(rec.get("requests", 1))
                total.prompt_tokens += int(rec.get("prompt_tokens", 0))
                total.completion_tokens += int(rec.get("completion_tokens", 0))
                total.cost += float(rec.get("cost", 0.0))
            except (TypeError, ValueError):
                raise DataError(f"{self.path}:{n}: damaged spending ledger (a non-numeric amount); repair the "
                                f"line, or delete the file to start the count from zero") from None
        total.cost += sum(reserved.values())
        return total

    def _append(self, rec: dict[str, Any]) -> None:
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def reserve(self, cost: float) -> str:
        """Record a request about to be sent that may cost up to `cost`; returns its id for `settle`."""
        rid = f"{self._session}-{next(self._ids)}"
        self._append({"id": rid, "reserve": cost})
        return rid

    def settle(self, rid: str, cost: float, prompt_tokens: int, completion_tokens: int, sent: bool) -> None:
        """Record what a reserved request cost (`sent`: it returned an answer; else it counts no request)."""
        self._append({"id": rid, "cost": cost, "prompt_tokens": prompt_tokens,
                      "completion_tokens": completion_tokens, "requests": int(sent)})

    def carry(self, usage: Usage) -> None:
        """Record spending from before the ledger existed (e.g. a run's earlier stats.json)."""
        self._append({"id": "carried", "cost": usage.cost, "prompt_tokens": usage.prompt_tokens,
                      "completion_tokens": usage.completion_tokens, "requests": usage.requests})
        self.spent = self._read()


def _reason(e: BaseException) -> str:
    """The server's own words for a refused request (its error message), on one line."""
    body = getattr(e, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else None
    msg = (err.get("message") if isinstance(err, dict) else err) or getattr(e, "message", None) or e
    return " ".join(str(msg).split())[:300]


def retry_after(e: BaseException) -> float | None:
    """Seconds a server asked us to wait (`retry-after-ms`, or `Retry-After` as seconds or an HTTP date), or
    None."""
    headers = getattr(getattr(e, "response", None), "headers", None)
    if not headers:
        return None
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


class OpenAILM(LM):
    """An OpenAI-compatible endpoint (`base_url` like http://host:port/v1; None: the client's default)."""

    seeds_per_request = True  # every request is sampled on its own: each may carry its own seed

    def __init__(self, base_url: str | None, model: str, *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", chat: bool = False, stream: bool = False,
                 system: str | None = None, batch_size: int = 16, concurrency: int = 4, timeout: float = 600.0,
                 max_retries: int = 0, backoff: float = 1.0, max_backoff: float = 30.0,
                 price_per_1k_input: float = 0.0, price_per_1k_output: float = 0.0,
                 budget: float | None = None, bos_text: str | None = None, ledger: str | None = None,
                 max_retry_after: float = 600.0) -> None:
        import openai

        self.base_url = base_url.rstrip("/") if base_url else None
        self.model = model
        self.where = f"openai:{model}@{self.base_url}" if self.base_url else f"openai:{model}"
        self.identity = f"openai:{self.base_url}:{model}"
        self.chat, self.stream, self.system = bool(chat), bool(stream), system
        self.batch_size = max(1, int(batch_size))
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.price_in, self.price_out = float(price_per_1k_input), float(price_per_1k_output)
        self.budget = None if budget is None else float(budget)
        self.bos_text = bos_text or None
        self.ledger = SpendLedger(ledger) if ledger else None
        self.max_retry_after = float(max_retry_after)
        key = api_key or os.environ.get(api_key_env) or "sk-no-key"  # local servers accept any key
        self.client = openai.OpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=0)
        self._lock = threading.Lock()
        self._reserved = 0.0  # worst-case cost of requests in flight
        self._stop = False

    # ---- cost accounting ----------------------------------------------------------------------------------------
    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1000 * self.price_in + completion_tokens / 1000 * self.price_out

    @property
    def spent(self) -> float:
        """Everything spent against the budget: this process's cost, plus the ledger's earlier spending."""
        return (self.ledger.spent.cost if self.ledger else 0.0) + self.usage.cost

    def _reserve(self, prompt_chars: int, max_new: int) -> tuple[float, str | None] | None:
        """Reserve the worst-case cost of one request (recorded in the ledger before it is sent): (cost, ledger
        id); None when the budget cannot cover it."""
        worst = self._cost(prompt_chars // 2 + 16, max_new)  # ~2 chars/token is a safe (high) prompt estimate
        with self._lock:
            if self._stop:
                return None
            if self.budget is not None and self.spent + self._reserved + worst > self.budget + 1e-12:
                self._stop = True
                return None
            self._reserved += worst
            return worst, self.ledger.reserve(worst) if self.ledger else None

    def _settle(self, reservation: tuple[float, str | None], prompt_tokens: int, completion_tokens: int,
                sent: bool = False) -> None:
        cost = self._cost(prompt_tokens, completion_tokens)
        with self._lock:
            self._reserved -= reservation[0]
            self.usage.prompt_tokens += prompt_tokens
            self.usage.completion_tokens += completion_tokens
            self.usage.cost += cost
            if reservation[1] is not None:
                self.ledger.settle(reservation[1], cost, prompt_tokens, completion_tokens, sent)

    # ---- one request, retried -----------------------------------------------------------------------------------
    def _with_retries(self, send: Callable[[], tuple[T, int, int]], prompt_chars: int, max_new: int,
                      jitter_seed: int) -> T | None:
        """send() -> (result, prompt tokens, completion tokens), retried on transient failures; None when the
        budget stopped it before it was sent."""
        import openai

        rng = random.Random(jitter_seed)
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            reserved = self._reserve(prompt_chars, max_new)
            if reserved is None:
                return None
            try:
                result, pt, ct = send()
            except (openai.APITimeoutError, openai.APIConnectionError, openai.InternalServerError,
                    openai.RateLimitError, openai.APIResponseValidationError, _Retryable, ValueError) as e:
                # ValueError covers json.JSONDecodeError from a truncated body.
                self._settle(reserved, 0, 0)
                last = e
            except openai.APIStatusError as e:
                self._settle(reserved, 0, 0)
                if e.status_code in (408, 409, 425) or e.status_code >= 500:
                    last = e
                else:  # 4xx: our request is wrong; retrying will not help
                    with self._lock:
                        self.usage.failures += 1
                    cls = PromptRejected if e.status_code in REJECTING_STATUS else EndpointError
                    msg = f"{self.where}: HTTP {e.status_code}: {_reason(e)}"
                    raise (cls(msg, [], {}) if cls is PromptRejected else cls(msg)) from None
            except BaseException:
                self._settle(reserved, 0, 0)
                raise
            else:
                self._settle(reserved, pt, ct, sent=True)
                with self._lock:
                    self.usage.requests += 1
                return result
            if attempt < self.max_retries:
                with self._lock:
                    self.usage.retries += 1
                delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + rng.random() / 2)  # jitter
                asked = retry_after(last)  # the server knows when it will take us again: never sooner
                time.sleep(max(delay, min(asked, self.max_retry_after)) if asked is not None else delay)
        with self._lock:
            self.usage.failures += 1
        raise EndpointError(f"{self.where}: gave up after {self.max_retries + 1} attempt(s): {self._why(last)}")

    def _why(self, e: Exception | None) -> str:
        import openai

        if isinstance(e, openai.APIConnectionError) and not isinstance(e, openai.APITimeoutError):
            return f"cannot connect to {self.base_url or 'the default endpoint'} ({type(e).__name__}: {e})"
        return f"{type(e).__name__}: {e}"

    # ---- generation -----------------------------------------------------------------------------------------------
    def _messages(self, prompt: str) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": prompt}]

    def _request(self, prompt: str, s: Sampling) -> tuple[str, int, int]:
        """(text, prompt_tokens, completion_tokens) of one attempt; raises on anything untrustworthy."""
        common: dict[str, Any] = dict(model=self.model, max_tokens=s.max_new_tokens, temperature=s.temperature)
        if s.top_p is not None:
            common["top_p"] = s.top_p
        if s.seed is not None:
            common["seed"] = s.seed
        if s.top_k:
            common["extra_body"] = {"top_k": s.top_k}  # an extension (vLLM, phiforge serve)
        if s.stop:
            common["stop"] = list(s.stop)[:4]  # the API accepts at most 4; the rest are cut here
        if self.stream:
            return self._request_stream(prompt, s, common)
        if self.chat:
            resp = self.client.chat.completions.create(messages=self._messages(prompt), **common)
        else:
            resp = self.client.completions.create(prompt=prompt, **common)
        choices = getattr(resp, "choices", None)
        if not choices or not isinstance(choices, list):
            raise _Retryable("response without choices")
        c = choices[0]
        text = c.message.content if self.chat and getattr(c, "message", None) is not None else getattr(c, "text", None)
        if not isinstance(text, str):
            raise _Retryable("response without text")
        u = getattr(resp, "usage", None)
        if not u:  # servers that do not report usage: estimate (4 chars/token)
            return text, len(prompt) // 4 + 1, len(text) // 4 + 1
        return text, int(getattr(u, "prompt_tokens", 0) or 0), int(getattr(u, "completion_tokens", 0) or 0)

    def _request_stream(self, prompt: str, s: Sampling, common: dict) -> tuple[str, int, int]:
        deadline = time.monotonic() + self.timeout * max(1.0, s.max_new_tokens / 16)
        if self.chat:
            stream = self.client.chat.completions.create(messages=self._messages(prompt), stream=True, **common)
        else:
            stream = self.client.completions.create(prompt=prompt, stream=True, **common)
        parts: list[str] = []
        finish = None
        usage = None
        try:
            for chunk in stream:
                if time.monotonic() > deadline:
                    raise _Retryable("stream too slow (past its deadline)")
                if getattr(chunk, "usage", None):
                    usage = chunk.usage
                for c in getattr(chunk, "choices", None) or []:
                    piece = (c.delta.content if self.chat and getattr(c, "delta", None) else getattr(c, "text", None))
                    if piece:
                        parts.append(piece)
                    finish = getattr(c, "finish_reason", None) or finish
        finally:
            close = getattr(stream, "close", None)
            if close:
                close()
        if finish is None:
            raise _Retryable("stream ended without finish_reason (truncated)")
        text = "".join(parts)
        pt = int(getattr(usage, "prompt_tokens", 0) or 0) if usage else len(prompt) // 4 + 1
        ct = int(getattr(usage, "completion_tokens", 0) or 0) if usage else len(text) // 4 + 1
        return text, pt, ct

    def _generate(self, requests: list[GenRequest], on_result=None) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        errors: list[BaseException] = []
        rejected: dict[int, str] = {}
        with self._lock:
            self._stop = False

        def work(i: int) -> None:
            if errors:
                return
            r = requests[i]
            try:
                text = self._with_retries(lambda: self._request(r.context, r.sampling), len(r.context),
                                          r.sampling.max_new_tokens, jitter_seed=i)
            except PromptRejected as e:  # this prompt only: the others go on
                rejected[i] = str(e).removeprefix(f"{self.where}: ")
                return
            except BaseException as e:  # noqa: BLE001 - reported after the pool drains
                errors.append(e)
                return
            if text is not None:
                results[i] = cut_at_stop(text, r.sampling.stop)
                if on_result is not None:
                    on_result(i, results[i])

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            list(pool.map(work, range(len(requests))))
        if errors:
            raise errors[0]
        budget = None
        if any(r is None for i, r in enumerate(results) if i not in rejected):
            budget = (f"budget of {self.budget:g} reached (spent {self.spent:.4f}); "
                      f"{sum(r is not None for r in results)} of {len(requests)} completions in this batch finished")
        if rejected:
            first = min(rejected)
            raise PromptRejected(f"{self.where}: the server refused {len(rejected)} of {len(requests)} prompt(s), "
                                 f"e.g. request {first}: {rejected[first]}", results, rejected, budget)
        if budget is not None:
            raise BudgetExceeded(budget, results)
        return results  # type: ignore[return-value]

    # ---- log-likelihood -------------------------------------------------------------------------------------------
    def _echo_logprobs(self, prompts: list[str], first: int) -> list[Any]:
        """The prompts' own token logprobs (tokens, text_offset, token_logprobs, top_logprobs per prompt)."""

        def send() -> tuple[list[Any], int, int]:
            resp = self.client.completions.create(model=self.model, prompt=prompts, max_tokens=0, echo=True,
                                                  logprobs=1, temperature=0.0)
            choices = sorted(getattr(resp, "choices", None) or [], key=lambda c: getattr(c, "index", 0) or 0)
            lps = [getattr(c, "logprobs", None) for c in choices]
            if len(lps) != len(prompts) or any(not lp or not lp.token_logprobs for lp in lps):
                raise EndpointError(f"{self.where}: the server does not return prompt logprobs (echo=true, "
                                    f"logprobs=1); log-likelihood tasks need them — use generation tasks only")
            u = getattr(resp, "usage", None)
            return lps, int(getattr(u, "prompt_tokens", 0) or 0) if u else sum(map(len, prompts)) // 4, 0

        out = self._with_retries(send, sum(map(len, prompts)), 0, jitter_seed=first)
        if out is None:
            raise BudgetExceeded(f"budget of {self.budget:g} reached (spent {self.usage.cost:.4f})", [])
        return out

    def _split(self, ctx: str, cont: str) -> tuple[str, str]:
        """(prefix, scored text): the context's trailing whitespace moved to the continuation (the native split);
        an empty context becomes `bos_text`."""
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        return (ctx or self.bos_text or ""), cont

    def _loglikelihood(self, requests, on_result=None):
        out: list[tuple[float, bool]] = []
        for s in range(0, len(requests), self.batch_size):
            chunk = [self._split(c, x) for c, x in requests[s:s + self.batch_size]]
            for k, ((ctx, cont), lp) in enumerate(zip(chunk, self._echo_logprobs([c + x for c, x in chunk], s))):
                total, greedy = 0.0, True
                end = len(ctx) + len(cont)
                tops = lp.top_logprobs or [None] * len(lp.tokens)
                for t, off, v, top in zip(lp.tokens, lp.text_offset, lp.token_logprobs, tops):
                    if off < len(ctx) or off >= end:
                        continue
                    total += float(v if v is not None else 0.0)
                    if top:
                        greedy = greedy and max(top, key=top.get) == t
                out.append((total, greedy))
                if on_result:
                    on_result(s + k, out[-1])
        return out

    def _loglikelihood_rolling(self, texts, on_result=None):
        out: list[float] = []
        head = self.bos_text or ""
        for s in range(0, len(texts), self.batch_size):
            for k, lp in enumerate(self._echo_logprobs([head + t for t in texts[s:s + self.batch_size]], s)):
                out.append(float(sum(v for v, off in zip(lp.token_logprobs, lp.text_offset)
                                     if v is not None and off >= len(head))))
                if on_result:
                    on_result(s + k, out[-1])
        return out
