"""`phiforge synth`: seeded prompts -> teacher / procedural generators -> verification -> dedup -> JSONL shards.

Output directory:
    shard-00000.jsonl ...   kept samples, one JSON record per line, with provenance
    rejects.jsonl           prompts that were answered but not kept (key + reason), and prompts the teacher
                            refused (reason "teacher_rejected", its words in "detail"): never asked again;
                            a removed teacher passage keeps its first characters ("text") and is named on
                            stderr as it is removed
    stats.json              tokens, duplicate rate, pass rate, cost, reasons, passages trimmed (rewritten
                            atomically per batch, and when the run stops on an error: "stopped" then names it)
    cache.sqlite            teacher completions by sha256(teacher + prompt + sampling) (`cache: true`)
    spend.jsonl             an OpenAI-compatible teacher's spending ledger (phiforge.lm.openai_api.SpendLedger):
                            the `budget` is for the whole run, over every session and kill

Resuming: prompt i of a run is a pure function of (seed, i), and its key is sha256(prompt + teacher +
sampling). On start every shard and rejects.jsonl is read back (a trailing partial line, left by a kill in the
middle of a write, is cut off) and the keys found there are skipped. Lines are written whole, a batch at a
time, then flushed and fsynced, so a kill at any moment loses at most the batch in flight, and that batch's
teacher answers are still in the cache (keyed by each prompt's own seed, so they are found whatever the batches
of the rerun), its spending in the ledger.

A prompt the teacher refuses (HTTP 400/413/422) is a reject, not the end of the run; but a batch of several
prompts refused to the last one is an error (a setting is wrong, not the prompts), and nothing is recorded.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from phiforge.atomic import atomic_write_json
from phiforge.data.synth import procedural
from phiforge.data.synth.teachers import CachedTeacher, Teacher, full_sampling, make_teacher, request_key
from phiforge.errors import ConfigError, DataError
from phiforge.lm.base import BudgetExceeded, Usage
from phiforge.lm.openai_api import EndpointError, PromptRejected, SpendLedger
from phiforge.readers import iter_jsonl, read_json

SOURCES = ("python_exercises", "math_problems", "textbooks")
LEDGER = "spend.jsonl"
PROCEDURAL_VERSION = 1  # bump when a generator changes, so resumed runs do not mix old and new outputs


@dataclass
class SynthConfig:
    """A synth run (YAML keys = field names; see configs/synth.yaml)."""

    n: int = 200  # samples to keep
    seed: int = 0
    mix: dict[str, float] = field(default_factory=lambda: {"python_exercises": 0.5, "math_problems": 0.5})
    teacher: str | None = None  # needed when mix has textbooks: smollm2 | <hf dir / .gguf> | openai:... | phiforge:...
    teacher_options: dict[str, Any] = field(default_factory=dict)  # passed to make_teacher
    sampling: dict[str, Any] = field(default_factory=lambda: {"max_new_tokens": 256, "temperature": 0.8,
                                                               "top_p": 0.95})
    batch_size: int = 16  # prompts per teacher call (and per write)
    procedural_batch: int = 64  # procedural samples per write / sandbox round
    formats: dict[str, float] = field(default_factory=dict)  # format -> weight (empty: data file weights)
    audiences: dict[str, float] = field(default_factory=dict)
    topics: list[str] = field(default_factory=lambda: ["builtin"])
    min_chars: int = 80  # shorter teacher generations are dropped
    dedup_threshold: float = 0.8  # estimated Jaccard of 5-word shingles at which a text is a near duplicate
    verify_code: bool = True
    sandbox_timeout: float = 5.0
    sandbox_memory_mb: int = 512
    sandbox_workers: int = 2
    strict_values: bool = True  # code checks refuse non-builtin returned values (see phiforge.sandbox)
    shard_size: int = 5000
    max_prompts_factor: float = 4.0  # give up after n * factor prompts (dropped ones included)
    cache: bool = True

    @classmethod
    def load(cls, path: str | os.PathLike) -> SynthConfig:
        from phiforge.config import read_yaml

        return cls.from_dict(read_yaml(path, what="synth settings"), where=str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "synth config") -> SynthConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**raw)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "synth config") -> None:
        bad = sorted(set(self.mix) - set(SOURCES))
        if bad:
            raise ConfigError(f"{where}: mix: unknown source(s) {bad}; known: {list(SOURCES)}")
        if not any(float(w) > 0 for w in self.mix.values()):
            raise ConfigError(f"{where}: mix: every weight is 0")
        if float(self.mix.get("textbooks", 0)) > 0 and not self.teacher:
            raise ConfigError(f"{where}: mix has textbooks but no `teacher` is set (e.g. teacher: smollm2)")
        if int(self.n) < 1 or int(self.batch_size) < 1 or int(self.shard_size) < 1:
            raise ConfigError(f"{where}: n, batch_size and shard_size must be >= 1")
        full_sampling(self.sampling)  # unknown sampling keys are errors


@dataclass
class Job:
    index: int
    source: str
    key: str
    prompt: str
    teacher: str
    sampling: dict[str, Any]
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- shard files


def read_jsonl_resumable(path: Path, fields: tuple[str, ...] = ("key",)) -> list[dict]:
    """Records of a JSONL file written by this module, each an object with string `fields`; a trailing partial
    line (a kill mid-write) is cut off. Any other damage is a DataError naming FILE:LINE."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the last line never got its newline: it is incomplete, drop it from the file
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    out = []
    for n, rec, reason in iter_jsonl(path):
        if reason is None and not (isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in fields)):
            reason = f"not a record of this run (an object with {', '.join(fields)})"
        if reason is not None:
            raise DataError(f"{path}:{n}: {reason}; was this file edited by hand? Repair or delete the line (its "
                            f"prompt is then done again)")
        out.append(rec)
    return out


def append_lines(path: Path, records: list[dict]) -> None:
    """Append whole lines in one write, then flush + fsync (a crash leaves at most one partial last line)."""
    if not records:
        return
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(path, "ab") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


class ShardWriter:
    """Appends records to shard-NNNNN.jsonl files of at most `shard_size` lines."""

    def __init__(self, out: Path, shard_size: int, existing: dict[Path, int]):
        self.out, self.shard_size = out, shard_size
        self.index = max((int(p.stem.split("-")[1]) for p in existing), default=0)
        self.count = existing.get(self._path(), 0)

    def _path(self) -> Path:
        return self.out / f"shard-{self.index:05d}.jsonl"

    def write(self, records: list[dict]) -> None:
        while records:
            if self.count >= self.shard_size:
                self.index, self.count = self.index + 1, 0
            take = records[: self.shard_size - self.count]
            append_lines(self._path(), take)
            self.count += len(take)
            records = records[len(take):]


# ----------------------------------------------------------------------------------------------- helpers


def approx_tokens(text: str) -> int:
    """Word pieces and punctuation marks: a tokenizer-free stand-in (~ a BPE token count for English)."""
    return len(re.findall(r"\w+|[^\w\s]", text))


_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The Python code of a generation: its fenced blocks joined, or the whole text if it parses as Python."""
    blocks = _FENCE.findall(text)
    if not blocks and "```" in text:  # an unterminated fence (generation cut at max tokens)
        blocks = [text.split("```", 1)[1].split("\n", 1)[-1]]
    code = "\n\n".join(b.strip("\n") for b in blocks) if blocks else text
    try:
        ast.parse(code)
    except SyntaxError:
        return None
    return code if "def " in code else None


# ------------------------------------------------------------------------------------ teacher passages
# A teacher's passage ends where its token budget ran out, often mid-sentence or inside a code block; a small
# teacher also loops, echoes its instructions or writes nothing readable. Passages are trimmed back to their last
# complete sentence or code block, then checked; what fails is removed with a named reason (`passage_problem`).

_FENCE_LINE = re.compile(r"^[ \t]*```(.*)$", re.MULTILINE)
# a sentence's end: . ! ? then closing quotes, brackets or markdown emphasis, then whitespace or the end
_SENT_END = re.compile(r"""[.!?]["'\u201d\u2019)\]*_]*(?=\s|$)""")
_ABBREV = {"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "fig", "cf"}
PASSAGE_EXCERPT = 600  # characters of a removed passage kept in rejects.jsonl (the report shows a few)


def _sentence_ends(text: str, start: int, end: int) -> list[int]:
    """Offsets just past each sentence end in text[start:end] (prose only: the caller skips code blocks); a
    list marker ("2.") or an abbreviation ("e.g.") is no sentence end."""
    out = []
    for m in _SENT_END.finditer(text, start, end):
        line_start = text.rfind("\n", 0, m.start()) + 1
        before = text[line_start:m.start()]
        if re.fullmatch(r"\s*[-*]?\s*\w{1,3}", before) and text[m.start()] == ".":
            continue  # "1." / "a." / "- 2." at a line's start: a list marker
        word = re.search(r"([\w.]+)$", before)
        if text[m.start()] == "." and word and word.group(1).lower() in _ABBREV:
            continue
        out.append(m.end())
    return out


def trim_passage(text: str) -> str:
    """`text` cut back to its last complete sentence or closed code block (whitespace stripped): a generation
    stopped by its token limit loses its unfinished tail, a complete one is returned unchanged. An unclosed code
    block at the end is dropped whole. "" when nothing complete is left."""
    text = text.strip()
    fences = list(_FENCE_LINE.finditer(text))
    cut = len(text)
    if len(fences) % 2:  # the last fence opened a block the limit cut off
        cut = fences[-1].start()
        fences = fences[:-1]
    # prose regions between code blocks; each closed block's end is itself a boundary
    boundaries: list[int] = []
    pos = 0
    for opener, closer in zip(fences[::2], fences[1::2]):
        boundaries += _sentence_ends(text, pos, opener.start())
        boundaries.append(closer.end())
        pos = closer.end()
    boundaries += _sentence_ends(text, pos, cut)
    end = max(boundaries, default=0)
    return text[:end].rstrip()


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def passage_problem(text: str, prompt: str = "", min_chars: int = 80, topic_words: tuple[str, ...] = ()) -> str | None:
    """Why a (trimmed) teacher passage is too broken to train on, or None when it is fine:
    empty, too_short (< `min_chars`), few_letters (under 40 % of its non-space characters are letters),
    unbalanced_fences (an odd number of ``` or a closing fence with a language tag), repeated_lines (3 in 10 of
    its lines are repeats), repeated_ngrams (3 in 10 of its word 4-grams are repeats), prompt_echo (it copies a
    run of 9+ words of the prompt; the topic's own words, passed as `topic_words`, do not count)."""
    if not text.strip():
        return "empty"
    if len(text) < min_chars:
        return "too_short"
    visible = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in visible) < 0.4 * len(visible):
        return "few_letters"
    fences = _FENCE_LINE.findall(text)
    if text.count("```") % 2 or any(tag.strip() for tag in fences[1::2]):
        return "unbalanced_fences"
    lines = [ln.strip() for ln in text.splitlines() if re.search(r"\w", ln)]
    if len(lines) >= 4 and (len(lines) - len(set(lines))) >= 0.3 * len(lines):
        return "repeated_lines"
    words = _words(text)
    grams = list(zip(words, words[1:], words[2:], words[3:]))
    if len(grams) >= 16 and (len(grams) - len(set(grams))) >= 0.3 * len(grams):
        return "repeated_ngrams"
    if prompt:
        for t in topic_words:  # a run may not span the topic: it is the passage's subject, not an echo
            prompt = prompt.replace(t, " | ")
        n = 8
        runs = set()
        for part in prompt.split("|"):
            pw = _words(part)
            runs |= {tuple(pw[i:i + n]) for i in range(len(pw) - n + 1)}
        hits = sum(tuple(words[i:i + n]) in runs for i in range(len(words) - n + 1))
        if hits >= 2:  # two overlapping 8-word runs: 9 words in a row
            return "prompt_echo"
    return None


def split_tests(code: str) -> tuple[str, str]:
    """(code without top-level asserts, the top-level assert lines)."""
    keep, tests = [], []
    for line in code.splitlines():
        (tests if line.startswith("assert ") else keep).append(line)
    return "\n".join(keep).rstrip() + "\n", "\n".join(tests)


def _usage(raw: Any) -> Usage:
    """A Usage from a stats.json's "teacher_usage" (anything unreadable in it counts as 0)."""
    u = Usage()
    for k, v in (raw.items() if isinstance(raw, dict) else []):
        if hasattr(u, k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
            setattr(u, k, type(getattr(u, k))(v))
    return u


def _seed_of(seed: int, index: int) -> int:
    return int(hashlib.sha256(f"{seed}:job:{index}".encode()).hexdigest()[:8], 16)


# -------------------------------------------------------------------------------------------------- run


class SynthRun:
    """One (possibly resumed) synth run into `out`."""

    def __init__(self, cfg: SynthConfig, out: str | os.PathLike, teacher: Teacher | None = None,
                 log: Callable[[str], None] | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.log = log or (lambda m: print(m, file=sys.stderr))
        self.out.mkdir(parents=True, exist_ok=True)
        self.mix = {k: float(v) for k, v in cfg.mix.items() if float(v) > 0}
        self.teacher: Teacher | None = None
        self.sampler = None
        self.ledger: SpendLedger | None = None
        self._load_state()
        if "textbooks" in self.mix:
            from phiforge.data.synth.prompts import PromptSampler, words_for_tokens

            # ask for what the token budget can hold, so that passages end where their writer ended them
            budget = int(full_sampling(cfg.sampling)["max_new_tokens"])
            self.sampler = PromptSampler(cfg.seed, cfg.topics, cfg.formats or None, cfg.audiences or None,
                                         max_words=words_for_tokens(budget))
            if teacher is None:
                from phiforge.progress import working

                with working(f"synth: loading the teacher {cfg.teacher}"):  # a local model can take a minute
                    teacher = make_teacher(str(cfg.teacher), **self._teacher_options())
            inner = teacher
            self.ledger = getattr(getattr(inner, "lm", None), "ledger", None)
            self.teacher = CachedTeacher(inner, self.out / "cache.sqlite") if cfg.cache else inner
        self.sampling = full_sampling(cfg.sampling)

    def _teacher_options(self) -> dict[str, Any]:
        """The config's teacher options; an endpoint also keeps its spending in the run's ledger (started from
        the cost an earlier stats.json recorded, for runs from before the ledger)."""
        from phiforge.lm.spec import backend_for

        opts = dict(self.cfg.teacher_options)
        if backend_for(str(self.cfg.teacher)) == "openai" and "ledger" not in opts:
            path = self.out / LEDGER
            if not path.exists() and self.base_usage.cost > 0:
                SpendLedger(path).carry(self.base_usage)
            opts["ledger"] = str(path)
        return opts

    # -- state from disk
    def _load_state(self) -> None:
        from phiforge.data.synth.dedup import DedupIndex

        self.done: set[str] = set()
        self.counts: Counter = Counter()
        self.dedup = DedupIndex(self.cfg.dedup_threshold)
        existing: dict[Path, int] = {}
        kept_texts: list[str] = []
        for path in sorted(self.out.glob("shard-*.jsonl")):
            recs = read_jsonl_resumable(path, ("key", "text"))
            existing[path] = len(recs)
            for r in recs:
                self.done.add(r["key"])
                kept_texts.append(r["text"])
                self._count(r, kept=True)
        for r in read_jsonl_resumable(self.out / "rejects.jsonl"):
            self.done.add(r["key"])
            self._count(r, kept=False)
        for i in range(0, len(kept_texts), 1024):
            self.dedup.check(kept_texts[i:i + 1024])
        self.writer = ShardWriter(self.out, int(self.cfg.shard_size), existing)
        prev: dict[str, Any] = {}
        if (self.out / "stats.json").exists():
            try:  # a summary, rewritten from the shards: damage loses only the earlier sessions' counters
                prev = read_json(self.out / "stats.json", what="synth stats")
            except DataError as e:
                self.log(f"phiforge synth: {e}; starting its counters over")
        self.base_usage = _usage(prev.get("teacher_usage"))
        sessions = prev.get("sessions", 0)
        self.sessions = (sessions if isinstance(sessions, int) and sessions >= 0 else 0) + 1
        self.stopped: str | None = None
        self.error: str | None = None

    def _count(self, r: dict, kept: bool) -> None:
        c = self.counts
        c["kept" if kept else "rejected"] += 1
        c[f"source:{r.get('source')}:{'kept' if kept else 'rejected'}"] += 1
        if not kept:
            c[f"reason:{r.get('reason')}"] += 1
        if r.get("tests") in ("passed", "failed"):
            c["code_checked"] += 1
            c["code_passed"] += r["tests"] == "passed"
        if kept:
            c["tokens"] += int(r.get("approx_tokens", 0))
            c["trimmed"] += bool(r.get("trimmed_chars"))

    # -- jobs
    def job(self, index: int) -> Job:
        seed = _seed_of(self.cfg.seed, index)
        names = sorted(self.mix)
        source = random.Random(f"{self.cfg.seed}:source:{index}").choices(
            names, weights=[self.mix[n] for n in names], k=1)[0]
        if source == "textbooks":
            spec = self.sampler.sample(index)
            sampling = {**self.sampling, "seed": seed}
            meta = {"topic": spec.topic.topic, "subdomain": spec.topic.subdomain, "domain": spec.topic.domain,
                    "audience": spec.audience, "format": spec.format, "kind": spec.kind,
                    "constraints": spec.constraints}
            teacher = self.teacher.name
            prompt = spec.prompt
        else:
            teacher, sampling, meta = "procedural", {"seed": seed, "version": PROCEDURAL_VERSION}, {}
            prompt = f"procedural:{source}"
        return Job(index, source, request_key(teacher, prompt, sampling), prompt, teacher, sampling, seed, meta)

    # -- records
    def _base(self, job: Job) -> dict[str, Any]:
        return {"id": job.key[:16], "key": job.key, "index": job.index, "source": job.source,
                "prompt": job.prompt, "teacher": job.teacher, "sampling": job.sampling, "seed": job.seed}

    def _procedural(self, job: Job) -> dict[str, Any]:
        rng = random.Random(job.seed)
        rec = self._base(job)
        if job.source == "python_exercises":
            ex = procedural.python_exercise(rng)
            rec.update(kind="code", format="exercise with solution", topic=f"python: {ex.template}",
                       audience=None, text=ex.code,
                       task={"prompt": ex.prompt, "solution": ex.solution, "tests": ex.tests,
                             "entry_point": ex.entry_point, "template": ex.template},
                       _check=ex.check)
        else:
            p = procedural.math_problem(rng)
            rec.update(kind="math", format="worked example", topic=f"math: {p.template}", audience=None,
                       text=p.text, question=p.question, answer=procedural._fmt(p.answer),
                       _verified=procedural.verify_math(p))
        return rec

    def _from_teacher(self, job: Job, text: str, sent: dict) -> dict[str, Any]:
        rec = self._base(job)
        rec.update(job.meta)
        rec["sampling_sent"] = sent
        rec["text"] = text.strip()
        if job.meta.get("kind") == "code":
            rec["kind"] = "code"
            code = extract_code(text)
            if code is None:
                rec["_reject"] = "no_code"
            else:
                body, tests = split_tests(code)
                if not tests:
                    rec["_reject"] = "no_tests"
                else:
                    entry = job.meta["constraints"].get("function_name")
                    rec["task"] = {"code": body, "tests": tests, "entry_point": entry}
                    from phiforge.sandbox import Check

                    rec["_check"] = Check(body, tests)
        else:
            rec["kind"] = "text"
            trimmed = trim_passage(rec["text"])
            if trimmed != rec["text"]:
                rec["trimmed_chars"] = len(rec["text"]) - len(trimmed)
            why = "no_complete_sentence" if rec["text"] and not trimmed else passage_problem(
                trimmed, job.prompt, int(self.cfg.min_chars),
                tuple(job.meta[k] for k in ("topic", "subdomain", "domain") if job.meta.get(k)))
            if why:
                rec["_reject"] = why
                rec["_removed_text"] = rec["text"]
            rec["text"] = trimmed
        return rec

    # -- one batch
    def _process(self, jobs: list[Job]) -> list[dict]:
        """Records for `jobs` (kept ones without `reason`); raises BudgetExceeded after saving what finished."""
        recs: list[dict | None] = [None] * len(jobs)
        budget_error: BudgetExceeded | None = None
        tj = [i for i, j in enumerate(jobs) if j.source == "textbooks"]
        if tj:
            refused: dict[int, str] = {}
            try:
                texts = self.teacher.generate([jobs[i].prompt for i in tj], self.sampling,
                                              seeds=[jobs[i].seed for i in tj])
            except BudgetExceeded as e:
                texts, budget_error = e.partial, e
            except PromptRejected as e:
                if len(tj) > 1 and len(e.rejected) == len(tj):  # every prompt: a setting is wrong, not the prompts
                    raise EndpointError(f"{e} (every prompt of the batch was refused: check the teacher's "
                                        f"settings, e.g. max_new_tokens against its context; nothing was "
                                        f"recorded)") from None
                texts, refused = e.partial, e.rejected
                if e.budget_message is not None:
                    budget_error = BudgetExceeded(e.budget_message, e.partial)
            per_request = getattr(getattr(self.teacher, "backend", None), "seeds_per_request", False)
            for k, (i, t) in enumerate(zip(tj, texts)):
                sent = {**self.sampling, "seed": jobs[i].seed if per_request else jobs[tj[0]].seed}
                if t is not None:
                    recs[i] = self._from_teacher(jobs[i], t, sent)
                elif k in refused:  # recorded as a reject, with the teacher's words: never asked again
                    recs[i] = {**self._base(jobs[i]), **jobs[i].meta, "text": "", "sampling_sent": sent,
                               "_reject": "teacher_rejected", "detail": refused[k]}
        for i, j in enumerate(jobs):
            if j.source != "textbooks":
                recs[i] = self._procedural(j)
        done = [r for r in recs if r is not None]
        # Code: function + asserts through the sandbox's check harness, in parallel.
        progs = [r for r in done if "_check" in r and "_reject" not in r]
        if progs and self.cfg.verify_code:
            from phiforge.sandbox import check_programs

            results = check_programs([r["_check"] for r in progs], timeout=float(self.cfg.sandbox_timeout),
                                     memory_mb=int(self.cfg.sandbox_memory_mb), workers=int(self.cfg.sandbox_workers),
                                     strict=bool(self.cfg.strict_values))
            for r, res in zip(progs, results):
                r["tests"] = "passed" if res.passed else "failed"
                if not res.passed:
                    r["_reject"] = "tests_failed" if res.status == "failed" else f"tests_{res.status}"
        for r in done:
            if r.pop("_verified", True) is False:
                r["_reject"] = "math_check_failed"
        # Dedup what survived, in index order.
        cand = [r for r in done if "_reject" not in r]
        for r, why in zip(cand, self.dedup.check([r["text"] for r in cand], add=True)):
            if why:
                r["_reject"] = why
        for r in done:
            r.pop("_check", None)
            if "_reject" not in r:
                r.pop("_removed_text", None)
            if "_reject" in r:
                r["reason"] = r.pop("_reject")
            else:
                r["approx_tokens"] = approx_tokens(r["text"])
        if budget_error is not None:
            self._budget_error = budget_error
        return done

    # -- main loop
    def run(self, n: int | None = None) -> dict[str, Any]:
        from phiforge.progress import progress

        n = int(n or self.cfg.n)
        limit = int(n * float(self.cfg.max_prompts_factor)) + 1
        self._budget_error = None
        kept0 = self.counts["kept"]
        bar = progress(total=n, desc="synth", unit="sample", initial=min(kept0, n))
        index = 0
        try:
            while self.counts["kept"] < n and index < limit:
                size = int(self.cfg.batch_size) if "textbooks" in self.mix else int(self.cfg.procedural_batch)
                jobs: list[Job] = []
                while len(jobs) < size and index < limit:
                    j = self.job(index)
                    index += 1
                    if j.key not in self.done:
                        jobs.append(j)
                if not jobs:
                    break  # every prompt up to the limit is answered
                recs = self._process(jobs)
                room = n - self.counts["kept"]
                kept = [r for r in recs if "reason" not in r][:room]
                rejected = [r for r in recs if "reason" in r]
                self.writer.write(kept)  # kept first: a kill between the two writes only re-runs the rejects
                append_lines(self.out / "rejects.jsonl", [
                    {k: r.get(k) for k in ("key", "index", "source", "reason", "tests", "teacher", "format")}
                    | ({"detail": r["detail"]} if "detail" in r else {})
                    | ({"text": r.get("_removed_text", r["text"])[:PASSAGE_EXCERPT]}
                       if r["source"] == "textbooks" and r.get("text") else {}) for r in rejected])
                for r in rejected:  # nothing lost silently: each removed teacher passage is named
                    if r["source"] == "textbooks" and r["reason"] != "teacher_rejected":
                        snippet = " ".join(r.get("_removed_text", r.get("text", "")).split())[:70]
                        self.log(f"textbooks: removed passage {r['id']} (prompt {r['index']}, {r['reason']}): "
                                 f"{snippet!r}")
                for r in kept + rejected:
                    self.done.add(r["key"])
                    self._count(r, kept="reason" not in r)
                bar.update(len(kept))
                self.write_stats()
                if self._budget_error is not None:
                    self.stopped = "budget"
                    self.log(f"phiforge synth: stopping: {self._budget_error}; finished samples are saved")
                    break
            if self.stopped is None and self.counts["kept"] < n:
                self.stopped = "max_prompts"
                self.log(f"phiforge synth: only {self.counts['kept']} of {n} samples kept after {limit} "
                         "prompts (max_prompts_factor); the rest were duplicates or failed checks")
        except BaseException as e:  # the stats of what was done, and why it stopped, whatever stopped it
            self.stopped = "interrupted" if isinstance(e, KeyboardInterrupt) else "error"
            self.error = str(e) or type(e).__name__
            self.write_stats()
            raise
        finally:
            bar.close()
        return self.write_stats()

    def usage(self) -> Usage:
        """The run's teacher usage over every session: an endpoint's requests, tokens and cost from its ledger
        (in-flight requests of a killed session included), the rest summed from stats.json and this session."""
        u = Usage(**self.base_usage.as_dict())
        if self.teacher is not None:
            cur = getattr(self.teacher, "usage", Usage())
            for k, v in cur.as_dict().items():
                setattr(u, k, getattr(u, k) + v)
        if self.ledger is not None:
            for k in ("requests", "prompt_tokens", "completion_tokens", "cost"):
                setattr(u, k, getattr(self.ledger.spent, k) + getattr(self.teacher.usage, k))
        return u

    def stats(self) -> dict[str, Any]:
        c = self.counts
        answered = c["kept"] + c["rejected"]
        dups = c["reason:exact_duplicate"] + c["reason:near_duplicate"]
        u = self.usage()
        return {
            "kept": c["kept"], "rejected": c["rejected"], "answered": answered,
            "duplicates": {"exact": c["reason:exact_duplicate"], "near": c["reason:near_duplicate"],
                           "rate": round(dups / answered, 4) if answered else 0.0},
            "code": {"checked": c["code_checked"], "passed": c["code_passed"],
                     "pass_rate": round(c["code_passed"] / c["code_checked"], 4) if c["code_checked"] else None,
                     "sandbox": self._sandbox_info() if c["code_checked"] else None},
            "reasons": {k.split(":", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("reason:")},
            # kept teacher passages that were cut back to their last complete sentence or code block
            "trimmed": c["trimmed"],
            "by_source": {s: {"kept": c[f"source:{s}:kept"], "rejected": c[f"source:{s}:rejected"]}
                          for s in SOURCES if c[f"source:{s}:kept"] or c[f"source:{s}:rejected"]},
            "tokens": {"kept_text_approx": c["tokens"], "teacher_prompt": u.prompt_tokens,
                       "teacher_completion": u.completion_tokens},
            "cost": round(u.cost, 6),
            "teacher": getattr(self.teacher, "name", None) or "procedural",
            "teacher_usage": u.as_dict(),
            "cache_hits": getattr(self.teacher, "hits", 0),
            "sessions": self.sessions,
            "stopped": self.stopped,
            **({"error": self.error} if self.error else {}),
            "seed": self.cfg.seed,
        }

    def _sandbox_info(self) -> dict[str, str]:
        from phiforge.sandbox import sandbox_info

        return sandbox_info()  # the mode and limits this session's code checks ran under

    def write_stats(self) -> dict[str, Any]:
        s = self.stats()
        atomic_write_json(self.out / "stats.json", s)
        return s


def run_synth(cfg: SynthConfig, out: str | os.PathLike, n: int | None = None, teacher: Teacher | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a synth job into `out`; returns the stats (also in out/stats.json)."""
    run = SynthRun(cfg, out, teacher=teacher, log=log)
    try:
        return run.run(n)
    finally:
        if isinstance(run.teacher, CachedTeacher):
            run.teacher.close()


def read_samples(out: str | os.PathLike) -> list[dict]:
    """Every kept record of a synth output directory, in shard order."""
    recs: list[dict] = []
    for path in sorted(Path(out).glob("shard-*.jsonl")):
        recs.extend(read_jsonl_resumable(path))
    return recs
