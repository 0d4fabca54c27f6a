"""Small-sample statistics for comparing training runs across seeds (`phiforge run --ablate`).

With a handful of seeds per arm, the honest summaries are Student-t ones:

- `mean_ci(xs)`: the mean and its two-sided 95 % confidence interval, mean +- t(0.975, n-1) * sd / sqrt(n).
- `paired_diff(a, b)`: arms that share a seed share their initialisation and data order, so the test of "b differs
  from a" is the paired t-test on the per-seed differences b_i - a_i (mean difference, its 95 % interval, two-sided
  p). When every difference is identical (sd = 0, e.g. both arms pass 0 % on every seed) the t statistic is
  undefined: p = 1 if the differences are all zero, else p = 0 (an exact, if degenerate, separation; the report
  shows n so a reader can judge it).
- `holm(ps)`: Holm-Bonferroni step-down adjustment, so "significant" in a table of many comparisons keeps the
  family-wise error at 5 %.

    mean_ci([0.71, 0.79, 0.75])       # {'mean': 0.75, 'lo': 0.65..., 'hi': 0.84..., 'n': 3}
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _t_quantile(q: float, df: int) -> float:
    from scipy.stats import t  # scipy comes with scikit-learn, a dependency

    return float(t.ppf(q, df))


def mean_ci(xs: Sequence[float | None], level: float = 0.95) -> dict[str, float | int | None]:
    """Mean and two-sided Student-t interval of the values that are not None (n = how many); with one value the
    interval is that value (no spread to estimate), with none everything is None."""
    v = [float(x) for x in xs if x is not None]
    n = len(v)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    m = sum(v) / n
    if n == 1:
        return {"mean": m, "lo": m, "hi": m, "n": 1}
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    half = _t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def paired_diff(a: Sequence[float | None], b: Sequence[float | None], level: float = 0.95) -> dict[str, float | int | None]:
    """Paired comparison of b against a (same seeds, same order): mean of b_i - a_i, its interval, and the two-sided
    paired t-test p-value. Pairs with a None on either side are left out; fewer than two pairs gives p = None."""
    d = [float(y) - float(x) for x, y in zip(a, b) if x is not None and y is not None]
    ci = mean_ci(d, level)
    n = len(d)
    if n < 2:
        return {"diff": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "p": None, "n": n}
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    if sd == 0.0:
        p = 1.0 if m == 0.0 else 0.0
    else:
        from scipy.stats import t

        p = float(2 * t.sf(abs(m) / (sd / math.sqrt(n)), n - 1))
    return {"diff": m, "lo": ci["lo"], "hi": ci["hi"], "p": p, "n": n}


def holm(ps: Sequence[float | None], alpha: float = 0.05) -> list[bool | None]:
    """Which of the p-values are significant at family-wise level `alpha` (Holm-Bonferroni); None stays None."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out: list[bool | None] = [None] * len(ps)
    m = len(idx)
    rejecting = True
    for rank, i in enumerate(idx):
        rejecting = rejecting and ps[i] <= alpha / (m - rank)
        out[i] = rejecting
    return out
