"""The one on-disk result cache (SQLite) in front of any LM: an interrupted or repeated evaluation or synthesis
resumes for free, and a completion already paid for is never asked for twice.

Key = sha256(model identity + method + request), where the identity names the weights (path + size/mtime of
the weight files, or endpoint + model name), so changed weights never reuse stale results. Results are written
as they arrive (committed every second or so, and whenever a call ends, even by an error), which is what makes
a killed run resumable. Eval caches of earlier versions (the same `results` table and keys) still hit; the
synthesis teachers' old `completions` table is not read (those completions are asked for again).

A caller may key a request otherwise than it is sent (`generate_keyed`): a synthesis teacher keys each prompt
with its own seed, whatever seed the batch it went in was sampled with, so a rerun that batches differently
still finds every answer. A file that is not a readable SQLite database is a DataError naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phiforge.errors import DataError
from phiforge.lm.base import LM, BudgetExceeded, GenRequest, OnResult
from phiforge.lm.openai_api import PromptRejected
from phiforge.progress import progress

CACHE_VERSION = 1


class ResultCache:
    """A key -> JSON value table in one SQLite file; safe to use from several threads. Writes are committed at
    most `commit_every` seconds apart (0: each one at once, for results that cost money)."""

    def __init__(self, path: str | os.PathLike, *, commit_every: float = 1.0) -> None:
        self.path = Path(path)
        self.commit_every = commit_every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._errors():
            self.db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
            self.db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.commit()
        self._lock = threading.Lock()  # one connection shared by the threads of a concurrent backend
        self._last_commit = time.monotonic()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """A damaged database file (truncated, overwritten) as one DataError naming it and the way out."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: damaged result cache ({e}); delete it to start an empty one (what it "
                            f"held is computed, or paid for, again)") from None

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        with self._lock, self._errors():
            for s in range(0, len(keys), 500):
                chunk = keys[s:s + 500]
                q = f"SELECT key, value FROM results WHERE key IN ({','.join('?' * len(chunk))})"
                for k, v in self.db.execute(q, chunk):
                    try:
                        found[k] = json.loads(v)
                    except ValueError:  # a damaged row: computed again
                        continue
        return found

    def put(self, key: str, value: Any) -> None:
        with self._lock, self._errors():
            self.db.execute("INSERT OR REPLACE INTO results (key, value) VALUES (?, ?)", (key, json.dumps(value)))
            if time.monotonic() - self._last_commit >= self.commit_every:
                self._commit()

    def commit(self) -> None:
        with self._lock, self._errors():
            self._commit()

    def _commit(self) -> None:
        self.db.commit()
        self._last_commit = time.monotonic()

    def close(self) -> None:
        self.commit()
        self.db.close()


def request_key(identity: str, method: str, request: Any) -> str:
    blob = json.dumps([CACHE_VERSION, identity, method, request], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class CachedLM(LM):
    """Wraps an LM: answers cached requests from SQLite, sends only the misses, counts hits/misses in `stats` and
    (with `show_progress`) shows a progress bar (requests/s and ETA). `usage` is the wrapped LM's."""

    def __init__(self, lm: LM, cache: ResultCache | None, *, desc: str = "requests",
                 show_progress: bool = True) -> None:
        self.lm = lm
        self.cache = cache
        self.identity = lm.identity
        self.desc = desc
        self.show_progress = show_progress
        self.stats = {"hits": 0, "misses": 0}

    @property
    def usage(self):
        return self.lm.usage

    def _run(self, method: str, requests: list, keyed: list, call, on_result: OnResult | None) -> list:
        keys = [request_key(self.identity, method, k) for k in keyed]
        found = self.cache.get_many(list(set(keys))) if self.cache else {}
        out: list[Any] = [None] * len(requests)
        todo: list[int] = []
        for i, k in enumerate(keys):
            if k in found:
                out[i] = _restore(method, found[k])
                if on_result:
                    on_result(i, out[i])
            else:
                todo.append(i)
        self.stats["hits"] += len(requests) - len(todo)
        self.stats["misses"] += len(todo)
        if not todo:
            return out
        bar = progress(total=len(todo), desc=f"{self.desc} ({method})", unit="req") if self.show_progress else None

        def done(j: int, value: Any) -> None:
            i = todo[j]
            out[i] = value
            if self.cache is not None:
                self.cache.put(keys[i], value)
            if on_result:
                on_result(i, value)
            if bar is not None:
                bar.update(1)

        try:
            call([requests[i] for i in todo], done)
        except BudgetExceeded as e:  # what finished (cached or new) goes back in the caller's request order
            raise BudgetExceeded(str(e), out) from None
        except PromptRejected as e:  # the same, and the refused prompts by the caller's index
            raise PromptRejected(str(e), out, {todo[j]: why for j, why in e.rejected.items()},
                                 e.budget_message) from None
        finally:
            if bar is not None:
                bar.close()
            if self.cache is not None:
                self.cache.commit()
        return out

    def _loglikelihood(self, requests, on_result=None):
        return self._run("loglikelihood", requests, [list(r) for r in requests], self.lm._loglikelihood, on_result)

    def _loglikelihood_rolling(self, texts, on_result=None):
        return self._run("loglikelihood_rolling", texts, texts, self.lm._loglikelihood_rolling, on_result)

    def _generate(self, requests: list[GenRequest], on_result=None):
        return self._run("generate_until", requests, [r.key() for r in requests], self.lm._generate, on_result)

    def generate_keyed(self, requests: list[GenRequest], keys: list[GenRequest],
                       on_result: OnResult | None = None) -> list[str]:
        """`generate_until(requests)`, each request cached under `keys[i]` (the same request as the caller
        identifies it, e.g. with its own seed where the batch was sampled with another)."""
        return self._run("generate_until", requests, [k.key() for k in keys], self.lm._generate, on_result)


def _restore(method: str, value: Any) -> Any:
    if method == "loglikelihood":
        return (float(value[0]), bool(value[1]))
    return value
