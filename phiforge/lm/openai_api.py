"""The OpenAI-compatible backend: any endpoint (vLLM, llama.cpp server, Ollama, `phiforge serve`, OpenAI) through
the `openai` client.

Generation sends one request per prompt, at most `concurrency` in flight, to `/completions` (or, with `chat`, to
`/chat/completions` as one user turn after an optional `system` message; `stream` reads server-sent events).
Log-likelihood asks `/completions` for the prompt's own token logprobs (`echo=true, logprobs=1, max_tokens=0`)
and sums those of the tokens that start at or after the end of the context; servers that do not return prompt
logprobs raise a clear error.

Reliability and cost live here, for every caller (eval and synthesis teachers alike). The client's own retries
are off (max_retries=0): timeouts, connection errors, 429/5xx, truncated or malformed bodies and streams that
stall or end early are retried up to `max_retries` times with exponential backoff (`backoff` * 2**attempt,
capped at `max_backoff`, with jitter); each request has `timeout` seconds (a stream also a total deadline of the
same length per max_new_tokens / 16 tokens, so a trickling stream ends). Cost = tokens / 1000 * price; a request
that could take the total over `budget` (its prompt estimate plus its whole max_new_tokens) is not sent, and
generation raises `BudgetExceeded` carrying the completions that did finish.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from phiforge.errors import PhiforgeError
from phiforge.lm.base import LM, BudgetExceeded, GenRequest
from phiforge.lm.sampling import Sampling, cut_at_stop

T = TypeVar("T")


class EndpointError(PhiforgeError):
    """A request the server refused (4xx), or one that still failed after every retry."""


class _Retryable(Exception):
    """A response we do not trust (malformed, truncated, stalled): ask again."""


class OpenAILM(LM):
    """An OpenAI-compatible endpoint (`base_url` like http://host:port/v1; None: the client's default)."""

    def __init__(self, base_url: str | None, model: str, *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", chat: bool = False, stream: bool = False,
                 system: str | None = None, batch_size: int = 16, concurrency: int = 4, timeout: float = 600.0,
                 max_retries: int = 0, backoff: float = 1.0, max_backoff: float = 30.0,
                 price_per_1k_input: float = 0.0, price_per_1k_output: float = 0.0,
                 budget: float | None = None) -> None:
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
        key = api_key or os.environ.get(api_key_env) or "sk-no-key"  # local servers accept any key
        self.client = openai.OpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=0)
        self._lock = threading.Lock()
        self._reserved = 0.0  # worst-case cost of requests in flight
        self._stop = False

    # ---- cost accounting ----------------------------------------------------------------------------------------
    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1000 * self.price_in + completion_tokens / 1000 * self.price_out

    def _reserve(self, prompt_chars: int, max_new: int) -> float | None:
        """Reserve the worst-case cost of one request; None when the budget cannot cover it."""
        worst = self._cost(prompt_chars // 2 + 16, max_new)  # ~2 chars/token is a safe (high) prompt estimate
        with self._lock:
            if self._stop:
                return None
            if self.budget is not None and self.usage.cost + self._reserved + worst > self.budget + 1e-12:
                self._stop = True
                return None
            self._reserved += worst
            return worst

    def _settle(self, reserved: float, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self._reserved -= reserved
            self.usage.prompt_tokens += prompt_tokens
            self.usage.completion_tokens += completion_tokens
            self.usage.cost += self._cost(prompt_tokens, completion_tokens)

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
                    raise EndpointError(f"{self.where}: HTTP {e.status_code}: {e.message}") from None
            except BaseException:
                self._settle(reserved, 0, 0)
                raise
            else:
                self._settle(reserved, pt, ct)
                with self._lock:
                    self.usage.requests += 1
                return result
            if attempt < self.max_retries:
                with self._lock:
                    self.usage.retries += 1
                delay = min(self.max_backoff, self.backoff * 2 ** attempt)
                time.sleep(delay * (0.5 + rng.random() / 2))  # jitter spreads retries of many workers
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
        with self._lock:
            self._stop = False

        def work(i: int) -> None:
            if errors:
                return
            r = requests[i]
            try:
                text = self._with_retries(lambda: self._request(r.context, r.sampling), len(r.context),
                                          r.sampling.max_new_tokens, jitter_seed=i)
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
        if any(r is None for r in results):
            raise BudgetExceeded(
                f"budget of {self.budget:g} reached (spent {self.usage.cost:.4f}); "
                f"{sum(r is not None for r in results)} of {len(requests)} completions in this batch finished",
                results)
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

    def _loglikelihood(self, requests, on_result=None):
        out: list[tuple[float, bool]] = []
        for s in range(0, len(requests), self.batch_size):
            chunk = requests[s:s + self.batch_size]
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
        for s in range(0, len(texts), self.batch_size):
            for k, lp in enumerate(self._echo_logprobs(texts[s:s + self.batch_size], s)):
                out.append(float(sum(v for v in lp.token_logprobs if v is not None)))
                if on_result:
                    on_result(s + k, out[-1])
        return out
