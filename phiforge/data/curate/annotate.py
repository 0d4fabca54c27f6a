"""Educational-value annotation with a teacher LLM: rubric prompt, score parsing, a resumable cache.

The output is a JSONL file, one line per sample: {"id", "sha256", "score", "response", "teacher", "text"}.
It doubles as the cache: a rerun skips every (sample hash, teacher, rubric) already in it, so an interrupted
run resumes where it stopped. Unparseable answers are stored with score null (and retried on the next run).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from phiforge.data.curate.classifier import RUBRIC

MAX_SAMPLE_CHARS = 3000
_SCORE = re.compile(r"educational\s+score\s*[:=]\s*\**\s*([0-5])\b", re.IGNORECASE)
_LAST_DIGIT = re.compile(r"\b([0-5])\s*(?:/\s*5)?\s*\W*\s*$")


def rubric_text() -> str:
    return RUBRIC.read_text(encoding="utf-8")


def build_prompt(sample: str, rubric: str | None = None) -> str:
    """The annotation prompt: the rubric, then the sample (truncated), then the answer format."""
    rubric = rubric or rubric_text()
    body = sample[:MAX_SAMPLE_CHARS] + ("\n[... truncated]" if len(sample) > MAX_SAMPLE_CHARS else "")
    return (f"{rubric.strip()}\n\n<sample>\n{body}\n</sample>\n\n"
            "Justify your score in at most 100 words, then end with the line:\nEducational score: <0-5>\n")


def parse_score(response: str) -> int | None:
    """The score from a teacher's answer: the last "Educational score: N", else a bare final digit 0-5."""
    hits = _SCORE.findall(response or "")
    if hits:
        return int(hits[-1])
    m = _LAST_DIGIT.search((response or "").strip())
    return int(m.group(1)) if m else None


def _key(text: str, teacher: str, rubric: str) -> str:
    h = hashlib.sha256()
    for part in (text, "\0", teacher, "\0", rubric):
        h.update(part.encode("utf-8"))
    return h.hexdigest()


def annotate(samples: Iterable[tuple[str, str]], teacher, out_path: str | os.PathLike, *, teacher_name: str,
             batch_size: int = 8, sampling: dict | None = None, rubric: str | None = None,
             log=print) -> dict:
    """Score (id, text) samples with `teacher.generate(prompts, sampling)`; append results to `out_path`.

    Returns counts: {"cached", "scored", "unparsed", "total"}.
    """
    from phiforge.progress import progress

    rubric = rubric or rubric_text()
    sampling = {"temperature": 0.0, "max_new_tokens": 256, **(sampling or {})}
    out = Path(out_path)
    done: set[str] = set()
    if out.exists():
        for line in out.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run: that sample is redone
            if r.get("score") is not None:
                done.add(r["key"])
    todo = []
    counts = {"cached": 0, "scored": 0, "unparsed": 0, "total": 0}
    for sid, text in samples:
        counts["total"] += 1
        k = _key(text, teacher_name, rubric)
        if k in done:
            counts["cached"] += 1
        else:
            done.add(k)  # the same text twice in the input is annotated once
            todo.append((sid, text, k))
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = progress(total=len(todo), desc="annotate", unit="sample")
    # appending line by line (flushed per batch) is what makes the run resumable
    with open(out, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            responses = teacher.generate([build_prompt(t, rubric) for _, t, _ in batch], sampling)
            for (sid, text, k), resp in zip(batch, responses):
                score = parse_score(resp)
                counts["scored" if score is not None else "unparsed"] += 1
                f.write(json.dumps({"id": sid, "key": k, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                                    "score": score, "teacher": teacher_name, "response": resp, "text": text},
                                   ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return counts
