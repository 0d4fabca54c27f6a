"""Metrics, standard errors and answer extraction.

- acc: the choice with the highest log-likelihood is the gold one. acc_norm: the same after dividing each
  log-likelihood by the choice's length in characters (lm-evaluation-harness's length normalisation). Ties go to
  the first choice (numpy argmax), as in lm-eval.
- Standard error of a mean of per-item scores: sample standard deviation (ddof=1) / sqrt(n); for 0/1 scores
  this is the binomial sqrt(p(1-p)/(n-1)).
- Macro average over k subsets: the unweighted mean of subset means; its standard error treats subsets as
  independent: sqrt(sum(se_i^2)) / k.
- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), computed as a stable product.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-item scores."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def macro_mean_stderr(parts: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(unweighted mean of subset means, sqrt(sum se^2)/k) for k independent subsets given as (mean, se)."""
    k = len(parts)
    if k == 0:
        return float("nan"), float("nan")
    mean = sum(m for m, _ in parts) / k
    se = math.sqrt(sum(s * s for _, s in parts if not math.isnan(s))) / k
    return mean, se


def argmax(xs: Sequence[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def mc_scores(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc and acc_norm (log-likelihood per character of the choice text) of one multiple-choice item."""
    norm = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
    return {"acc": float(argmax(lls) == gold), "acc_norm": float(argmax(norm) == gold)}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) passes: 1 - C(n-c,k)/C(n,k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials, no overflow.
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# ---- answer extraction ------------------------------------------------------------------------------------------
INVALID = "[invalid]"
_GSM_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
_GSM_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM_IGNORE = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]


def gsm8k_strict(text: str) -> str:
    """The number after the first 'The answer is' (the CoT exemplars' format), else '[invalid]'."""
    m = _GSM_STRICT.search(text)
    return m.group(1) if m else INVALID


def gsm8k_flexible(text: str) -> str:
    """The last number-looking span in the text, else '[invalid]'."""
    found = _GSM_FLEX.findall(text)
    if not found:
        return INVALID
    a, b = found[-1]
    return a or b


def gsm8k_normalize(s: str) -> str:
    """lm-eval's gsm8k exact-match normalisation: drop commas, '$', anything up to '#### ', a final '.';
    case-insensitive; surrounding whitespace stripped."""
    for r in _GSM_IGNORE:
        s = r.sub("", s)
    return s.strip().lower()


def gsm8k_target(answer: str) -> str:
    """The gold number of a GSM8K solution ('... #### 72' -> '72')."""
    return answer.split("####")[-1].strip()


_BBH_ANSWER = re.compile(r"the answer is (.*)", re.IGNORECASE)


def bbh_extract(text: str) -> str:
    """The answer after the first 'the answer is' on its line, without a trailing period, else '[invalid]'.

    lm-eval's regex `(?<=the answer is )(.*)(?=.)` drops the line's last character unconditionally; dropping
    only a final '.' gives the same result whenever the answer ends with a period (every official exemplar)
    and does not cut a real answer such as '24' when the model omits the period.
    """
    m = _BBH_ANSWER.search(text)
    if not m:
        return INVALID
    ans = m.group(1).strip()
    return ans[:-1].strip() if ans.endswith(".") else ans
