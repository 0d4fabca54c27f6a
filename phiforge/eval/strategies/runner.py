"""Prompting strategies (promptbase / Medprompt) for any multiple-choice task on any LM backend.

A `Strategy` is four independent choices, composed per question:

- exemplars (`shots`): none | random (k from the pool, seeded per question) | knn (the k pool items nearest to
  the question in embedding space, the nearest placed last, right before the question);
- chain of thought (`cot`): exemplars carry a self-generated rationale (the model's own zero-shot CoT on the pool
  item, kept only when its final answer equals the gold one) and the model reasons before answering;
- choice shuffling (`shuffles` m, `vote`): the question is asked under m orders of its options (identity first),
  each answer is mapped back to the original option, and the answers are combined by majority vote (ties:
  larger summed probability) or by the summed letter probabilities (`weighted`);
- a scratch-pad gate (`gate`, Medprompt+): `confidence` answers directly (kNN few-shot, same shuffles) when the
  ensemble's probability of its winning option is at least `threshold`, and falls back to CoT otherwise; `ask`
  asks the model whether the question needs step-by-step reasoning (log P(" yes") vs log P(" no")).

Answers are always read from log-likelihoods of the option letters: directly after "Answer:" or, with CoT,
after the generated reasoning followed by " Therefore, the answer is (" — so every strategy works on every
backend that has `loglikelihood` and (for CoT) `generate_until`.

Presets (`--strategy`): zero-shot, fewshot (random k), knn-fewshot, knn-shuffle (kNN + m-way choice shuffle),
medprompt (kNN + self-generated CoT + choice shuffle), medprompt+ (medprompt's CoT behind a confidence gate,
direct kNN few-shot otherwise). Modifiers join with '+': `knn-fewshot+shuffle5+weighted`, `fewshot+cot`,
`medprompt+gate-ask`, `knn-fewshot+k3`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from phiforge.errors import PhiforgeError
from phiforge.eval.strategies.embed import Embedder, EmbeddingCache, embedder_id, nearest
from phiforge.eval.strategies.items import (
    MCItem,
    argmax,
    format_question,
    header,
    letters,
    majority_vote,
    permutations,
    softmax,
    to_original,
    weighted_vote,
    wilson_interval,
)
from phiforge.lm import LM, GenRequest, Sampling

COT_TRIGGER = " Let's think step by step."
ANSWER_CUE = " Therefore, the answer is ("
COT_STOP = ("\n\n", "answer is", "Answer is", "Question:")
COT_PROMPT_VERSION = 1
_TRAILING_CUE = re.compile(r"[\s,]*(?:(?:so|thus|therefore|hence)[\s,]*)?(?:the\s*)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Strategy:
    name: str
    shots: str = "none"  # none | random | knn
    k: int = 5
    cot: bool = False
    shuffles: int = 1
    vote: str = "majority"  # majority | weighted
    gate: str | None = None  # None | confidence | ask
    threshold: float = 0.5


PRESETS: dict[str, Strategy] = {
    "zero-shot": Strategy("zero-shot"),
    "fewshot": Strategy("fewshot", shots="random"),
    "knn-fewshot": Strategy("knn-fewshot", shots="knn"),
    "knn-shuffle": Strategy("knn-shuffle", shots="knn", shuffles=5),
    "medprompt": Strategy("medprompt", shots="knn", cot=True, shuffles=5),
    "medprompt+": Strategy("medprompt+", shots="knn", cot=True, shuffles=5, gate="confidence"),
}


def parse_strategy(spec: str, *, k: int | None = None, shuffles: int | None = None, vote: str | None = None,
                   threshold: float | None = None) -> Strategy:
    """A preset name plus '+'-joined modifiers (shuffle[N], weighted, majority, cot, gate[-ask|-confidence],
    kN); keyword overrides apply to every strategy they make sense for (k only with exemplars, shuffles only
    where the preset or a modifier already shuffles)."""
    # "medprompt+" is a preset name, so split modifiers only after the longest matching preset
    base = max((p for p in PRESETS if spec == p or spec.startswith(p + "+")), key=len, default=None)
    if base is None:
        raise PhiforgeError(f"--strategy {spec!r}: unknown; presets are {', '.join(PRESETS)} (modifiers: "
                            f"+shuffleN, +weighted, +cot, +gate, +gate-ask, +kN)")
    s = replace(PRESETS[base], name=spec)
    if k is not None and s.shots != "none":
        s = replace(s, k=k)
    if shuffles is not None and s.shuffles > 1:
        s = replace(s, shuffles=shuffles)
    for mod in filter(None, spec[len(base):].split("+")):
        if m := re.fullmatch(r"shuffle(\d*)", mod):
            s = replace(s, shuffles=int(m.group(1)) if m.group(1) else (shuffles or 5))
        elif m := re.fullmatch(r"k(\d+)", mod):
            s = replace(s, k=int(m.group(1)))
        elif mod in ("weighted", "majority"):
            s = replace(s, vote=mod)
        elif mod == "cot":
            s = replace(s, cot=True)
        elif mod in ("gate", "gate-confidence", "gate-ask"):
            s = replace(s, cot=True, gate="ask" if mod == "gate-ask" else "confidence")
        else:
            raise PhiforgeError(f"--strategy {spec!r}: unknown modifier {mod!r} (shuffleN, weighted, majority, "
                                f"cot, gate, gate-ask, kN)")
    if vote is not None:
        s = replace(s, vote=vote)
    if threshold is not None:
        s = replace(s, threshold=threshold)
    if s.shots != "none" and s.k < 1:
        raise PhiforgeError(f"--strategy {spec!r}: k must be >= 1")
    if s.shuffles < 1:
        raise PhiforgeError(f"--strategy {spec!r}: shuffles must be >= 1")
    return s


# ---- data: evaluated items + few-shot pool ----------------------------------------------------------------------
@dataclass
class TaskData:
    task: str
    items: list[MCItem]  # evaluated
    pool: list[MCItem]  # exemplar pool, disjoint from items
    eval_desc: str
    pool_desc: str


def load_task_data(task: str, *, data_dir: str | os.PathLike | None = None, limit: int | None = None,
                   subjects: list[str] | None = None, pool_size: int = 100, allow_hub: bool = True) -> TaskData:
    """Items to evaluate and the few-shot pool for one multiple-choice task.

    MMLU: evaluated = the test split (only `subjects` when given; `limit` = first N per subject); pool = the dev
    split of all 57 subjects (285 items; MMLU has no train split). Other tasks (no train split in the local
    files): the first `pool_size` items of the evaluation file are held out as the pool and never evaluated;
    evaluated = the following items (`limit` = the first N of them).
    """
    from phiforge.eval.tasks import mc_task
    from phiforge.eval.tasks.multiple_choice import MMLU_SUBJECTS

    t = mc_task(task)
    docs, source = t.load(data_dir, allow_hub=allow_hub)
    own_pool = t.mc_pool(data_dir)
    if own_pool is not None:  # MMLU: exemplars from its dev split, so every test item can be evaluated
        if subjects:
            bad = [s for s in subjects if s not in MMLU_SUBJECTS]
            if bad:
                raise PhiforgeError(f"--subjects: unknown MMLU subject(s) {bad}")
        per: dict[str, int] = {}
        items = []
        for i, d in enumerate(docs):
            if subjects and d["subject"] not in subjects:
                continue
            per[d["subject"]] = per.get(d["subject"], 0) + 1
            if limit is None or per[d["subject"]] <= limit:
                items.append(t.mc_item(d, i))
        subj = f"{len(subjects)} subjects ({', '.join(subjects)})" if subjects else "57 subjects"
        per_s = f"first {limit} test items per subject" if limit is not None else "all test items"
        return TaskData(task, items, own_pool, f"{source}: {subj}, {per_s}: {len(items)} items",
                        f"MMLU dev split, all {len({x.subject for x in own_pool})} subjects: {len(own_pool)} items")
    if pool_size >= len(docs):
        raise PhiforgeError(f"task {task!r}: --pool-size {pool_size} leaves nothing to evaluate ({len(docs)} items)")
    all_items = [t.mc_item(d, i) for i, d in enumerate(docs)]
    pool, rest = all_items[:pool_size], all_items[pool_size:]
    items = rest if limit is None else rest[:limit]
    return TaskData(task, items, pool,
                    f"{source}: items {pool_size}..{pool_size + len(items) - 1} (0-based file order): "
                    f"{len(items)} items",
                    f"first {pool_size} items of the same file (0..{pool_size - 1}), held out: not evaluated")


# ---- the self-generated CoT store ----------------------------------------------------------------------------
class CoTStore:
    """Self-generated rationales of pool items for one model: uid -> {cot, pred, correct}, in a JSON file."""

    def __init__(self, directory: Path | None, identity: str, max_tokens: int) -> None:
        key = hashlib.sha256(f"{identity}|{COT_PROMPT_VERSION}|{max_tokens}".encode()).hexdigest()[:24]
        self.path = directory / f"cot_{key}.json" if directory else None
        self.data: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                self.data = {}  # a damaged cache is regenerated, never trusted
        self.stats = {"hits": 0, "generated": 0}

    def save(self) -> None:
        if self.path is not None:
            from phiforge.atomic import atomic_write_json

            atomic_write_json(self.path, self.data, indent=None)


def clean_reasoning(text: str) -> str:
    """Generated reasoning without a dangling 'Therefore, the' left by the stop at 'answer is'."""
    text = " ".join(text.strip().split("\n")).strip()
    return _TRAILING_CUE.sub("", text).strip()


# ---- the runner ----------------------------------------------------------------------------------------------
@dataclass
class ItemResult:
    uid: str
    gold: int
    pred: int
    route: str  # direct | cot
    votes: list[int]  # per permutation, mapped back to original indices
    confidence: float  # mean probability of `pred` over the permutations
    shots: list[str] = field(default_factory=list)


class StrategyRunner:
    """Runs strategies on TaskData with one LM (wrap it in CachedLM for the result cache)."""

    def __init__(self, lm: LM, *, embedder: Embedder | None = None, cache_dir: str | os.PathLike | None = None,
                 cot_max_tokens: int = 128, cot_candidates: int | None = None, seed: int = 0) -> None:
        self.lm = lm
        self.embedder = embedder
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.embeddings = EmbeddingCache(self.cache_dir / "embeddings" if self.cache_dir else None)
        self.cot_max_tokens = cot_max_tokens
        self.cot_candidates = cot_candidates
        self.seed = seed
        self.cot = CoTStore(self.cache_dir, lm.identity, cot_max_tokens)

    # ---- exemplar candidates: an ordered list of pool indices per item, best first ----
    def candidates(self, data: TaskData, s: Strategy, n: int) -> list[list[int]]:
        if s.shots == "none" or not data.pool:
            return [[] for _ in data.items]
        n = min(n, len(data.pool))
        if s.shots == "random":
            out = []
            for it in data.items:
                rng = random.Random(int(hashlib.sha256(f"{self.seed}:{it.uid}".encode()).hexdigest()[:12], 16))
                out.append(rng.sample(range(len(data.pool)), n))
            return out
        if self.embedder is None:
            raise PhiforgeError("kNN few-shot needs an embedder")
        pool_emb = self.embeddings.embed(self.embedder, [p.question for p in data.pool])  # (P, d)
        item_emb = self.embeddings.embed(self.embedder, [it.question for it in data.items])  # (Q, d)
        return nearest(item_emb, pool_emb, n).tolist()

    @staticmethod
    def _order(shots: list[MCItem], s: Strategy) -> list[MCItem]:
        # kNN: the nearest exemplar goes last, right before the question
        return list(reversed(shots)) if s.shots == "knn" else shots

    # ---- direct answers ----
    def direct(self, data: TaskData, s: Strategy, idx: list[int] | None = None) -> dict[int, ItemResult]:
        idx = list(range(len(data.items))) if idx is None else idx
        cands = self.candidates(data, s, s.k)
        reqs: list[tuple[str, str]] = []
        plan = []
        for i in idx:
            it = data.items[i]
            shots = self._order([data.pool[j] for j in cands[i]], s)
            prefix = header(it) + "".join(format_question(x) + " " + letters(len(x.options))[x.gold] + "\n\n"
                                          for x in shots)
            perms = permutations(it, s.shuffles, self.seed)
            start = len(reqs)
            for perm in perms:
                ctx = prefix + format_question(it, perm)
                reqs += [(ctx, " " + L) for L in letters(len(perm))]
            plan.append((i, perms, start, [x.uid for x in shots]))
        res = self.lm.loglikelihood(reqs) if reqs else []
        out = {}
        for i, perms, start, shot_ids in plan:
            probs = []
            for q, perm in enumerate(perms):
                n = len(perm)
                lls = [r[0] for r in res[start + q * n: start + (q + 1) * n]]
                probs.append(to_original(softmax(lls), perm))
            out[i] = self._combine(data.items[i], probs, s, "direct", shot_ids)
        return out

    @staticmethod
    def _combine(it: MCItem, probs: list[list[float]], s: Strategy, route: str, shot_ids: list[str]) -> ItemResult:
        votes = [argmax(p) for p in probs]
        pred = weighted_vote(probs) if s.vote == "weighted" else majority_vote(votes, probs)
        conf = sum(p[pred] for p in probs) / len(probs)
        return ItemResult(it.uid, it.gold, pred, route, votes, conf, shot_ids)

    # ---- chain of thought ----
    def _answer_after_reasoning(self, prompts: list[str], n_options: list[int]
                                ) -> tuple[list[list[float]], list[str]]:
        """Generate reasoning for each prompt, then letter probabilities after ' Therefore, the answer is ('
        -> (probabilities per prompt, cleaned reasoning per prompt)."""
        cot = Sampling(max_new_tokens=self.cot_max_tokens, stop=COT_STOP)
        gens = self.lm.generate_until([GenRequest(p, cot) for p in prompts])
        reasons = [clean_reasoning(g) for g in gens]
        reqs, spans = [], []
        for p, r, n in zip(prompts, reasons, n_options):
            ctx = p + (" " + r if r else "") + ANSWER_CUE
            spans.append((len(reqs), n))
            reqs += [(ctx, L) for L in letters(n)]
        res = self.lm.loglikelihood(reqs) if reqs else []
        return [softmax([x[0] for x in res[a:a + n]]) for a, n in spans], reasons

    def ensure_cot(self, pool: list[MCItem]) -> None:
        """Self-generate (and cache) the zero-shot CoT of every given pool item; mark those whose answer is gold."""
        todo = [x for x in pool if x.uid not in self.cot.data]
        self.cot.stats["hits"] += len(pool) - len(todo)
        if not todo:
            return
        prompts = [header(x) + format_question(x) + COT_TRIGGER for x in todo]
        probs, reasons = self._answer_after_reasoning(prompts, [len(x.options) for x in todo])
        for x, p, r in zip(todo, probs, reasons):
            pred = argmax(p)
            self.cot.data[x.uid] = {"cot": r, "pred": pred, "correct": bool(pred == x.gold and r)}
        self.cot.stats["generated"] += len(todo)
        self.cot.save()

    def cot_shots(self, data: TaskData, s: Strategy, idx: list[int]) -> dict[int, list[MCItem]]:
        """Per item: the first k candidates (nearest / random order) whose self-generated CoT was correct, among
        `cot_candidates` (default 3k) candidates; CoTs are generated only for the candidates actually needed."""
        if s.shots == "none":
            return {i: [] for i in idx}
        cands = self.candidates(data, s, self.cot_candidates or 3 * s.k)
        self.ensure_cot(sorted({data.pool[j] for i in idx for j in cands[i]}, key=lambda x: x.uid))
        out = {}
        for i in idx:
            good = [data.pool[j] for j in cands[i] if self.cot.data[data.pool[j].uid]["correct"]]
            out[i] = self._order(good[: s.k], s)
        return out

    def chain_of_thought(self, data: TaskData, s: Strategy, idx: list[int]) -> dict[int, ItemResult]:
        shots = self.cot_shots(data, s, idx)
        prompts, n_opts, plan = [], [], []
        for i in idx:
            it = data.items[i]
            prefix = header(it) + "".join(
                format_question(x) + COT_TRIGGER + " " + self.cot.data[x.uid]["cot"] + ANSWER_CUE
                + letters(len(x.options))[x.gold] + ").\n\n" for x in shots[i])
            perms = permutations(it, s.shuffles, self.seed)
            plan.append((i, perms, len(prompts)))
            for perm in perms:
                prompts.append(prefix + format_question(it, perm) + COT_TRIGGER)
                n_opts.append(len(perm))
        probs = self._answer_after_reasoning(prompts, n_opts)[0] if prompts else []
        out = {}
        for i, perms, start in plan:
            mapped = [to_original(probs[start + q], perm) for q, perm in enumerate(perms)]
            out[i] = self._combine(data.items[i], mapped, s, "cot", [x.uid for x in shots[i]])
        return out

    # ---- the gate ----
    def needs_scratchpad(self, data: TaskData, s: Strategy, direct: dict[int, ItemResult]) -> list[int]:
        """Indices routed to CoT: low ensemble confidence (`confidence`) or the model says so (`ask`)."""
        if s.gate == "confidence":
            return [i for i, r in direct.items() if r.confidence < s.threshold]
        if s.gate == "ask":
            reqs = []
            for it in data.items:
                q = format_question(it)[: -len("Answer:")]
                ctx = (f"{q}Does answering this question need step-by-step reasoning or calculation (a "
                       f"scratch-pad), or can it be answered directly from knowledge? Answer yes or no.\nAnswer:")
                reqs += [(ctx, " yes"), (ctx, " no")]
            res = self.lm.loglikelihood(reqs)
            return [i for i in range(len(data.items)) if res[2 * i][0] > res[2 * i + 1][0]]
        raise PhiforgeError(f"unknown gate {s.gate!r} (confidence, ask)")

    def run(self, data: TaskData, s: Strategy) -> list[ItemResult]:
        every = list(range(len(data.items)))
        if not s.cot:
            res = self.direct(data, s)
        elif s.gate is None:
            res = self.chain_of_thought(data, s, every)
        else:
            res = self.direct(data, s)
            routed = self.needs_scratchpad(data, s, res)
            res.update(self.chain_of_thought(data, s, routed))
        return [res[i] for i in every]


# ---- many strategies x tasks -> one results dict ----------------------------------------------------------
def default_strategy_cache_dir() -> Path:
    from phiforge.eval.evaluator import default_cache_path

    return default_cache_path().parent / "promptbase"


def evaluate_strategies(lm: LM, tasks: list[str], strategies: list[Strategy], *, embedder: Embedder | None = None,
                        data_dir: str | os.PathLike | None = None, limit: int | None = None,
                        subjects: list[str] | None = None, pool_size: int = 100,
                        cache_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                        use_cache: bool = True, cot_max_tokens: int = 128, cot_candidates: int | None = None,
                        seed: int = 0, allow_hub: bool = True, log_samples: bool = False,
                        model_spec: str = "") -> dict[str, Any]:
    """Every strategy on every task: {"config", "results": {strategy: {task: {...acc, ci95, n...}}}, "cache"}."""
    import phiforge
    from phiforge.eval.evaluator import default_cache_path, finish_results
    from phiforge.lm.cache import CachedLM, ResultCache

    if embedder is None and any(s.shots == "knn" for s in strategies):
        from phiforge.eval.strategies.embed import MiniLMEmbedder

        embedder = MiniLMEmbedder()
    cache = ResultCache(cache_path or default_cache_path()) if use_cache else None
    cdir = (Path(cache_dir) if cache_dir else default_strategy_cache_dir()) if use_cache else None
    out: dict[str, Any] = {
        "config": {"model": model_spec or lm.identity, "model_identity": lm.identity, "backend": type(lm).__name__,
                   "tasks": tasks, "strategies": [asdict(s) for s in strategies], "limit": limit,
                   "subjects": subjects, "pool_size": pool_size, "cot_max_tokens": cot_max_tokens,
                   "cot_candidates": cot_candidates, "seed": seed,
                   "embedder": embedder_id(embedder) if embedder is not None else None,
                   "answer_format": "letters after 'Answer:' (MMLU style) for every task",
                   "ci": "95% Wilson score interval", "phiforge_version": phiforge.__version__,
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "results": {}, "samples": {}}
    hits = misses = 0
    try:
        datas = {t: load_task_data(t, data_dir=data_dir, limit=limit, subjects=subjects, pool_size=pool_size,
                                   allow_hub=allow_hub) for t in tasks}
        for s in strategies:
            out["results"][s.name] = {}
            for t, data in datas.items():
                cached = CachedLM(lm, cache, desc=f"{s.name}/{t}")
                runner = StrategyRunner(cached, embedder=embedder, cache_dir=cdir, cot_max_tokens=cot_max_tokens,
                                        cot_candidates=cot_candidates, seed=seed)
                t0 = time.perf_counter()
                res = runner.run(data, s)
                correct = sum(r.pred == r.gold for r in res)
                lo, hi = wilson_interval(correct, len(res))
                routes: dict[str, int] = {}
                for r in res:
                    routes[r.route] = routes.get(r.route, 0) + 1
                out["results"][s.name][t] = {
                    "acc": correct / len(res) if res else float("nan"), "correct": correct, "n": len(res),
                    "ci95": [lo, hi], "routes": routes, "eval_items": data.eval_desc, "pool": data.pool_desc,
                    "cot_pool": _cot_pool_stats(runner, data) if s.cot else None,
                    "embedding_cache": dict(runner.embeddings.stats), "cache": dict(cached.stats),
                    "seconds": round(time.perf_counter() - t0, 2)}
                if log_samples:
                    out["samples"].setdefault(s.name, {})[t] = [asdict(r) for r in res]
                hits += cached.stats["hits"]
                misses += cached.stats["misses"]
    finally:
        if cache is not None:
            cache.close()
    return finish_results(out, hits, misses, log_samples)


def _cot_pool_stats(runner: StrategyRunner, data: TaskData) -> dict[str, int]:
    """How many of this task's pool items have a self-generated rationale, and how many of those were kept."""
    have = [runner.cot.data[p.uid] for p in data.pool if p.uid in runner.cot.data]
    return dict(runner.cot.stats, total=len(have), kept=sum(1 for v in have if v["correct"]))


def format_strategy_table(results: dict[str, Any]) -> str:
    """Strategies (rows) x tasks (columns): accuracy % [95% Wilson CI], then n per task."""
    tasks = results["config"]["tasks"]
    rows = [["strategy"] + tasks]
    for name, per in results["results"].items():
        cells = [name]
        for t in tasks:
            r = per.get(t)
            cells.append("-" if r is None else
                         f"{100 * r['acc']:.1f} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]")
        rows.append(cells)
    first = next(iter(results["results"].values()), {})
    rows.append(["n"] + [str(first.get(t, {}).get("n", "-")) for t in tasks])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("accuracy % [95% Wilson score interval]; answers scored as option letters (MMLU style)")
    return "\n".join(lines)


__all__ = ["PRESETS", "Strategy", "StrategyRunner", "TaskData", "evaluate_strategies", "format_strategy_table",
           "load_task_data", "parse_strategy"]
