"""How to pick tokens and when to stop: the one `Sampling` type every generator takes, and the one stop cut.

`Sampling` is what eval requests, teachers, `phiforge generate` (`generate.GenerationConfig` adds eos handling)
and the serving engine (`serve.engine.Request` holds one) all mean by "sampling settings". `temperature=0` is
greedy; `seed` makes sampled runs repeatable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """Token choice (HF order: repetition penalty -> temperature -> top-k -> top-p) and stopping.

    The first four fields keep their old positional order (`Sampling(0.8, seed=3)` still means temperature 0.8).
    `stop` is stored as a tuple, so a Sampling can key a dict (requests with equal settings batch together).
    """

    temperature: float = 0.0
    top_p: float | None = None  # keep the smallest set of tokens whose probability mass reaches top_p
    top_k: int | None = None  # keep the k most likely tokens (None or 0: all)
    seed: int | None = None  # seeds the sampler: same seed, same samples
    repetition_penalty: float = 1.0  # HF/CTRL: divide positive (multiply negative) logits of seen tokens
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings: the text is cut before the first one

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop or ()))

    def validate(self) -> None:
        """Raise ValueError naming the first impossible field."""
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


GREEDY = Sampling()


def find_stop(text: str, stop: Sequence[str], start: int = 0) -> int:
    """Where the earliest stop string begins in `text` at or after `start`; -1 when none does.
    Empty stop strings never match (they would cut every text to nothing)."""
    return min((i for s in stop if s and (i := text.find(s, start)) >= 0), default=-1)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first stop string."""
    cut = find_stop(text, stop)
    return text if cut < 0 else text[:cut]
