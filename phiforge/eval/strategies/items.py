"""Multiple-choice items in one letter format, choice permutations, votes and confidence intervals.

Every multiple-choice task turns its documents into `MCItem`s (question text, option texts, gold index:
`Task.mc_item`) and they are asked the MMLU way, whatever the task's own prompt format:

    <question>
    A. <option>
    B. <option>
    ...
    Answer:

and scored by the log-likelihood of each letter (" A", " B", ...). A permutation `perm` shows original option
`perm[j]` at letter j, so the letter j a model picks maps back to original option `perm[j]`.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

from phiforge.errors import PhiforgeError
from phiforge.eval.metrics import argmax
from phiforge.eval.tasks.base import MCItem

LETTERS = "ABCDEFGHIJ"


def letters(n: int) -> list[str]:
    if n > len(LETTERS):
        raise PhiforgeError(f"{n} options: at most {len(LETTERS)} are supported")
    return list(LETTERS[:n])


def format_question(item: MCItem, perm: Sequence[int] | None = None) -> str:
    """The question with its options under letters in `perm` order (identity when None), ending in 'Answer:'."""
    perm = list(range(len(item.options))) if perm is None else perm
    opts = "".join(f"\n{L}. {item.options[p]}" for L, p in zip(letters(len(perm)), perm))
    return f"{item.question}{opts}\nAnswer:"


def header(item: MCItem) -> str:
    about = f" about {item.subject.replace('_', ' ')}" if item.subject else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def permutations(item: MCItem, m: int, seed: int = 0) -> list[tuple[int, ...]]:
    """m distinct orders of the item's options: the identity first, then seeded random shuffles (at most n!)."""
    n = len(item.options)
    ident = tuple(range(n))
    out = [ident]
    limit = min(m, math.factorial(n))
    rng = random.Random(int(hashlib.sha256(f"{seed}:{item.uid}".encode()).hexdigest()[:12], 16))
    while len(out) < limit:
        p = list(ident)
        rng.shuffle(p)
        if tuple(p) not in out:
            out.append(tuple(p))
    return out


def to_original(values_by_letter: Sequence[float], perm: Sequence[int]) -> list[float]:
    """Re-index per-letter values (letter j shows option perm[j]) by original option index."""
    out = [0.0] * len(perm)
    for j, p in enumerate(perm):
        out[p] = values_by_letter[j]
    return out


def softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def majority_vote(preds: Sequence[int], probs: Sequence[Sequence[float]] | None = None) -> int:
    """The most frequent prediction; ties go to the larger summed probability (if given), then the lowest index."""
    counts: dict[int, int] = {}
    for p in preds:
        counts[p] = counts.get(p, 0) + 1
    top = max(counts.values())
    tied = sorted(o for o, c in counts.items() if c == top)
    if len(tied) > 1 and probs:
        mass = [sum(pr[o] for pr in probs) for o in tied]
        return tied[argmax(mass)]
    return tied[0]


def weighted_vote(probs: Sequence[Sequence[float]]) -> int:
    """The option with the largest summed probability over permutations (each already mapped back)."""
    total = [sum(col) for col in zip(*probs)]
    return argmax(total)


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion correct/n."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
