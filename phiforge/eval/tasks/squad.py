"""SQuAD v2 (Rajpurkar et al., 2018) as lm-evaluation-harness runs it (`squadv2`), the Phi-2 release's 2-shot.

Data: lighteval/squad_v2 (validation; few-shot exemplars from train), lm-eval's copy of squad_v2, or a local
copy (phiforge.eval.data). Prompt (lm-eval's):

    Title: {title}\n\nBackground: {context}\n\nQuestion: {question}\n\nAnswer:

A few-shot exemplar is that prompt, the target delimiter " ", its target (" " + first answer, or
" unanswerable") and "\n\n". The exemplars are drawn as lm-eval draws them: one random.Random(1234) for the
whole run, and for the i-th evaluated question `rng.sample(train, k + 1)` with that question removed, first k.

Per question two requests: greedy generation until "\n" (at most 256 new tokens, lm-eval's default) and the
log-likelihood of " unanswerable". Scoring is the official SQuAD v2 script as lm-eval calls it (HF evaluate's
`squad_v2`): answers normalised (lower case, punctuation and articles a/an/the removed, whitespace collapsed),
exact = any gold answer equal, F1 = best token-overlap F1 over the gold answers; an unanswerable question's only
gold answer is "", so it scores 1 only for an empty prediction. no_answer_probability = exp(ll(" unanswerable"))
never exceeds the default threshold 1.0, so exact/f1 are the raw scores; best_exact/best_f1 pick the threshold
on that probability that scores best. Metrics are fractions (lm-eval prints them x100).
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass

from phiforge.errors import DataError
from phiforge.eval.data import HubSplit, load_docs
from phiforge.eval.metrics import mean_stderr
from phiforge.eval.tasks.base import Task, TaskData, TaskResult
from phiforge.lm import GenRequest, Sampling

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
NO_ANSWER = "unanswerable"


# ---- the official SQuAD v2 evaluation (normalisation, exact, F1, best threshold) -------------------------------
def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def compute_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def compute_f1(gold: str, pred: str) -> float:
    g, p = _tokens(gold), _tokens(pred)
    if not g or not p:  # an empty side: 1 only if both are empty
        return float(g == p)
    same = sum((Counter(g) & Counter(p)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: list[str]) -> list[str]:
    """The gold answers that survive normalisation; [""] for an unanswerable question."""
    return [a for a in answers if normalize_answer(a)] or [""]


def best_threshold(preds: list[str], scores: list[float], na_probs: list[float], has_ans: list[bool]
                   ) -> tuple[float, float]:
    """(best score as a fraction, its threshold): answering 'no answer' when na_prob > threshold."""
    cur = best = float(sum(not h for h in has_ans))
    thresh = 0.0
    for i in sorted(range(len(preds)), key=lambda i: na_probs[i]):
        diff = scores[i] if has_ans[i] else (-1.0 if preds[i] else 0.0)
        cur += diff
        if cur > best:
            best, thresh = cur, na_probs[i]
    return best / max(len(preds), 1), thresh


def squad_v2_scores(preds: list[str], answers: list[list[str]], na_probs: list[float],
                    threshold: float = 1.0) -> tuple[list[float], list[float], dict[str, float]]:
    """Per-question exact and F1 (after the no-answer threshold) and the best-threshold aggregates."""
    has_ans = [bool([a for a in ans if normalize_answer(a)]) for ans in answers]
    exact_raw = [float(max(compute_exact(g, p) for g in gold_answers(a))) for p, a in zip(preds, answers)]
    f1_raw = [max(compute_f1(g, p) for g in gold_answers(a)) for p, a in zip(preds, answers)]

    def thresholded(raw: list[float]) -> list[float]:
        return [float(not h) if na > threshold else r for r, na, h in zip(raw, na_probs, has_ans)]

    best_exact, best_exact_t = best_threshold(preds, exact_raw, na_probs, has_ans)
    best_f1, best_f1_t = best_threshold(preds, f1_raw, na_probs, has_ans)
    extra = {"best_exact": best_exact, "best_exact_thresh": best_exact_t, "best_f1": best_f1,
             "best_f1_thresh": best_f1_t}
    return thresholded(exact_raw), thresholded(f1_raw), extra


# ---- the task -----------------------------------------------------------------------------------------------------
def squad_prompt(doc: dict) -> str:
    return f"Title: {doc['title']}\n\nBackground: {doc['context']}\n\nQuestion: {doc['question']}\n\nAnswer:"


def squad_target(doc: dict) -> str:
    answers = doc["answers"]["text"]
    return " " + (answers[0] if answers else NO_ANSWER)


def _row(r: dict) -> dict:
    return {"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
            "answers": {"text": list(r["answers"]["text"]), "answer_start": list(r["answers"]["answer_start"])}}


@dataclass
class SQuADv2Task(Task):
    stop: tuple[str, ...] = ("\n",)
    max_tokens: int = 256

    def hub_splits(self, subjects=None):
        return [HubSplit("lighteval/squad_v2", None, "validation"), HubSplit("lighteval/squad_v2", None, "train")]

    def fetch(self, data_dir=None, allow_hub=True, subjects=None):
        val, train = self.hub_splits()
        docs, src = load_docs(self.name, val, _row, data_dir, allow_hub=allow_hub)
        if self.num_fewshot == 0:
            return TaskData(docs, [src])
        pool, psrc = load_docs(self.name, train, _row, data_dir, allow_hub=allow_hub)
        return TaskData(docs, [src, psrc], pool=pool)

    def prompts(self, docs: list[dict], k: int, pool: list[dict] | None) -> list[str]:
        """Each question's context: k exemplars drawn as lm-eval draws them (module docstring), then its prompt."""
        if k and not pool:
            raise DataError("squadv2: few-shot exemplars need the train split (or use --num-fewshot 0)")
        rng = random.Random(FEWSHOT_SEED)
        out = []
        for d in docs:
            shots = [s for s in rng.sample(pool, k + 1) if s != d][:k] if k else []
            out.append("".join(squad_prompt(s) + " " + squad_target(s) + "\n\n" for s in shots) + squad_prompt(d))
        return out

    def run(self, lm, docs, *, num_fewshot=None, log_samples=False, data_dir=None, pool=None, max_tokens=None,
            **opts):
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        if k and pool is None:
            pool = self.fetch(data_dir).pool
        ctxs = self.prompts(docs, k, pool)
        settings = Sampling(max_new_tokens=max_tokens or self.max_tokens, stop=self.stop)
        outs = lm.generate_until([GenRequest(c, settings) for c in ctxs]) if ctxs else []
        lls = lm.loglikelihood([(c, " " + NO_ANSWER) for c in ctxs]) if ctxs else []
        na = [math.exp(ll) for ll, _ in lls]
        answers = [d["answers"]["text"] for d in docs]
        exact, f1, best = squad_v2_scores(outs, answers, na)
        has = [bool([a for a in ans if normalize_answer(a)]) for ans in answers]
        metrics = {"exact": mean_stderr(exact), "f1": mean_stderr(f1)}
        for name, keep in (("HasAns", True), ("NoAns", False)):
            idx = [i for i, h in enumerate(has) if h == keep]
            if idx:
                metrics[f"{name}_exact"] = mean_stderr([exact[i] for i in idx])
                metrics[f"{name}_f1"] = mean_stderr([f1[i] for i in idx])
        metrics["best_exact"] = (best["best_exact"], float("nan"))
        metrics["best_f1"] = (best["best_f1"], float("nan"))
        res = TaskResult(metrics, len(docs), ["metrics are fractions; lm-eval reports the same x100"])
        res.extra["thresholds"] = {"best_exact_thresh": best["best_exact_thresh"],
                                   "best_f1_thresh": best["best_f1_thresh"]}
        if log_samples:
            res.samples = [{"id": d["id"], "question": d["question"], "answers": d["answers"]["text"], "output": o,
                            "no_answer_probability": p, "exact": e, "f1": f}
                           for d, o, p, e, f in zip(docs, outs, na, exact, f1)]
        return res


def squad_tasks() -> list[Task]:
    return [SQuADv2Task("squadv2", "3.0", "generate_until",
                        "[k shots]Title: {title}\n\nBackground: {context}\n\nQuestion: {question}\n\nAnswer:",
                        ("exact", "f1"), num_fewshot=2, fewshot_pool="train split, lm-eval's seeded sampling",
                        local_path="", hub="lighteval/squad_v2",
                        notes="generation until newline + ll(' unanswerable'); official SQuAD v2 EM/F1")]
