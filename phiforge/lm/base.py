"""The model interface every task and teacher talks to.

One interface of three methods (each takes one request or a list of them; lists are batched):

    loglikelihood(context, continuation)  -> (log P(continuation | context), is_greedy)
    loglikelihood_rolling(text)           -> log P(text) (from the start-of-text token)
    generate_until(context, sampling)     -> completion text, cut before the first stop string

Every backend counts what it consumed in `usage` (requests, prompt and completion tokens; retries, failures and
cost for remote endpoints). Backends: `phiforge.lm.phiforge_backend.PhiforgeLM`, `phiforge.lm.hf.HFLM`,
`phiforge.lm.openai_api.OpenAILM`; `phiforge.lm.spec.load_lm` picks one from a model spec.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phiforge.errors import PhiforgeError
from phiforge.lm.sampling import GREEDY, Sampling

OnResult = Callable[[int, Any], None]  # (request index, result): called as soon as a result is ready


@dataclass(frozen=True)
class GenRequest:
    """Continue `context` as `sampling` says (its max_new_tokens and stop strings included)."""

    context: str
    sampling: Sampling = field(default=GREEDY)

    def key(self) -> dict:
        """The request as the result cache keys it (the shape of earlier versions, so old caches still hit)."""
        s = self.sampling
        picked = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed}
        if s.repetition_penalty != 1.0:
            picked["repetition_penalty"] = s.repetition_penalty
        return {"context": self.context, "stop": list(s.stop), "max_tokens": s.max_new_tokens, "sampling": picked}


@dataclass
class Usage:
    """What a backend has consumed so far (summed over calls)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failures: int = 0  # requests given up after all retries
    cost: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BudgetExceeded(PhiforgeError):
    """The next request would take the cost over the budget; `partial` holds the completions that finished
    (None where a request was not sent), in request order."""

    exit_code = 3

    def __init__(self, message: str, partial: list[str | None]):
        super().__init__(message)
        self.partial = partial


class LM:
    """Base class: the three public methods accept one request or a list; subclasses implement the list forms.

    `identity` names the model for the result cache (path + weight file sizes/mtimes, or endpoint + model).
    """

    identity: str = "lm"
    batch_size: int = 16

    @property
    def usage(self) -> Usage:
        """Requests and tokens consumed by this instance (created on first use: subclasses need no __init__)."""
        if "_usage" not in self.__dict__:
            self._usage = Usage()
        return self._usage

    # ---- public interface --------------------------------------------------------------------------------------
    def loglikelihood(self, context: str | Sequence[tuple[str, str]], continuation: str | None = None,
                      on_result: OnResult | None = None):
        """log P(continuation | context) and whether it is the greedy continuation.

        `loglikelihood(ctx, cont)` -> (float, bool); `loglikelihood([(ctx, cont), ...])` -> list of them.
        """
        if isinstance(context, str):
            return self._loglikelihood([(context, continuation or "")])[0]
        return self._loglikelihood(list(context), on_result)

    def loglikelihood_rolling(self, text: str | Sequence[str], on_result: OnResult | None = None):
        """Total log-probability of a text (str -> float; list -> list of floats)."""
        if isinstance(text, str):
            return self._loglikelihood_rolling([text])[0]
        return self._loglikelihood_rolling(list(text), on_result)

    def generate_until(self, context: str | Sequence[GenRequest], sampling: Sampling = GREEDY,
                       on_result: OnResult | None = None):
        """Completion of `context` cut before the first stop string (str -> str; list of GenRequest -> list)."""
        if isinstance(context, str):
            return self._generate([GenRequest(context, sampling)])[0]
        return self._generate(list(context), on_result)

    # ---- backend hooks -----------------------------------------------------------------------------------------
    def _loglikelihood(self, requests: list[tuple[str, str]], on_result: OnResult | None = None
                       ) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def _loglikelihood_rolling(self, texts: list[str], on_result: OnResult | None = None) -> list[float]:
        raise NotImplementedError

    def _generate(self, requests: list[GenRequest], on_result: OnResult | None = None) -> list[str]:
        raise NotImplementedError


def files_fingerprint(paths: Sequence[Path]) -> str:
    """A short hash of (name, size, mtime) of files: changes when weights change, cheap to compute."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def generation_batches(requests: list[GenRequest], batch_size: int) -> list[list[int]]:
    """Indices grouped by identical sampling settings, longest prompts first, at most batch_size each."""
    by_cfg: dict[Sampling, list[int]] = {}
    for i, r in enumerate(requests):
        by_cfg.setdefault(r.sampling, []).append(i)
    batches = []
    for idxs in by_cfg.values():
        idxs.sort(key=lambda i: -len(requests[i].context))
        batches += [idxs[k:k + batch_size] for k in range(0, len(idxs), batch_size)]
    return batches
