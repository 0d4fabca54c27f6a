"""The one result cache (phiforge.lm.cache) in front of any LM, as eval and the synthesis teachers use it."""

from __future__ import annotations

import threading

import pytest

from phiforge.lm.base import LM, BudgetExceeded, GenRequest
from phiforge.lm.cache import CachedLM, ResultCache
from phiforge.lm.sampling import Sampling


class Threaded(LM):
    """Answers from worker threads, as the OpenAI backend does; stops (like a budget) after `allow` answers."""

    identity = "threaded"

    def __init__(self, allow: int | None = None):
        self.allow, self.asked = allow, []

    def _generate(self, requests, on_result=None):
        out: list[str | None] = [None] * len(requests)

        def work(i: int) -> None:
            out[i] = requests[i].context.upper()
            on_result(i, out[i])

        n = len(requests) if self.allow is None else min(self.allow, len(requests))
        self.asked += [r.context for r in requests[:n]]
        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if n < len(requests):
            raise BudgetExceeded("budget reached", out)
        return out


def reqs(*texts):
    return [GenRequest(t, Sampling(max_new_tokens=4)) for t in texts]


def test_results_from_threads_are_cached_and_a_budget_stop_keeps_the_finished(tmp_path):
    db = tmp_path / "c.sqlite"
    first = CachedLM(Threaded(), ResultCache(db), show_progress=False)
    assert first.generate_until(reqs("a", "b")) == ["A", "B"]
    first.cache.close()
    inner = Threaded(allow=1)
    again = CachedLM(inner, ResultCache(db), show_progress=False)
    with pytest.raises(BudgetExceeded) as e:
        again.generate_until(reqs("a", "c", "d", "b"))
    # the partial result is in the caller's order and holds the cache hits too
    assert e.value.partial == ["A", "C", None, "B"] and inner.asked == ["c"]
    again.cache.close()
    third = CachedLM(Threaded(), ResultCache(db), show_progress=False)
    assert third.generate_until(reqs("c", "d")) == ["C", "D"] and third.stats == {"hits": 1, "misses": 1}


def test_cached_teacher_counts_hits_and_commits_each_completion(tmp_path):
    from phiforge.data.synth.teachers import CachedTeacher, LMTeacher

    inner = Threaded()
    t = CachedTeacher(LMTeacher(inner, "fake"), tmp_path / "t.sqlite")
    assert t.generate(["p", "q"], {"max_new_tokens": 4}) == ["P", "Q"]
    assert t.lm.cache.commit_every == 0.0  # nothing paid for is lost to a kill
    assert t.generate(["q", "p"], {"max_new_tokens": 4}) == ["Q", "P"] and t.hits == 2 and inner.asked == ["p", "q"]
    assert t.usage is inner.usage
    t.close()
