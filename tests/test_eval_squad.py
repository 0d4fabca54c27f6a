"""SQuAD v2, 2-shot generative as lm-eval runs it: the official normalisation, exact match and F1, unanswerable
questions and the best-threshold scores, on hand-computed cases; the task end to end on a small dataset built in
the hub's layout."""

from __future__ import annotations

import math

import pytest

from tests.test_eval_hub import SQUAD_TRAIN, datasets_cache, hub_root, online_hub  # noqa: F401 - fixtures


def test_normalisation_exact_and_f1():
    from phiforge.eval.tasks.squad import compute_exact, compute_f1, gold_answers, normalize_answer

    assert normalize_answer("The Normans, (of  France)!") == "normans of france"
    assert normalize_answer("theatre an apple") == "theatre apple"  # articles as words only
    assert compute_exact("in France", "in france.") == 1 and compute_exact("France", "in France") == 0
    assert compute_f1("in France", "France") == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P 1, R 1/2
    assert compute_f1("a b c", "c b a") == 1.0 and compute_f1("a b", "x y") == 0.0
    assert compute_f1("", "") == 1.0 and compute_f1("", "something") == 0.0 and compute_f1("the", "") == 1.0
    assert gold_answers([]) == [""] and gold_answers(["The", "Paris"]) == ["Paris"]


DOCS = [
    {"id": "q1", "title": "Normans", "context": "Normandy is a region in France.", "question": "Where is Normandy?",
     "answers": {"text": ["France", "France", "in France"], "answer_start": [24, 24, 21]}},
    {"id": "q2", "title": "Normans", "context": "Normandy is a region in France.", "question": "Who named Paris?",
     "answers": {"text": [], "answer_start": []}},
    {"id": "q3", "title": "Complexity", "context": "A problem is difficult if its solution requires significant "
     "resources.", "question": "What makes a problem difficult?",
     "answers": {"text": ["its solution requires significant resources"], "answer_start": [26]}},
    {"id": "q4", "title": "Complexity", "context": "A problem is difficult if its solution requires significant "
     "resources.", "question": "Who solved it first?", "answers": {"text": [], "answer_start": []}},
]
PRED = {"q1": " France", "q2": "", "q3": " significant resources.", "q4": " unanswerable"}
NA_PROB = {"q1": 0.1, "q2": 0.9, "q3": 0.2, "q4": 0.8}


def test_squad_v2_scores_by_hand():
    from phiforge.eval.tasks.squad import squad_v2_scores

    ids = [d["id"] for d in DOCS]
    exact, f1, best = squad_v2_scores([PRED[i] for i in ids], [d["answers"]["text"] for d in DOCS],
                                      [NA_PROB[i] for i in ids])
    r = 2 * 0.4 / 1.4  # q3: 2 of 5 gold tokens, both predicted tokens right
    assert exact == [1.0, 1.0, 0.0, 0.0]  # an unanswerable question scores only an empty prediction
    assert f1 == pytest.approx([1.0, 1.0, r, 0.0])
    # best threshold, questions by no-answer probability: start at 2 (the unanswerable ones), q1 +1 -> 3 (at 0.1),
    # q3 +0 / +r, q4 -1 (it answered), q2 +0
    assert best == pytest.approx({"best_exact": 3 / 4, "best_exact_thresh": 0.1, "best_f1": (3 + r) / 4,
                                  "best_f1_thresh": 0.2})
    # no-answer probability above the threshold: counted as "no answer"
    exact_t, _, _ = squad_v2_scores([PRED[i] for i in ids], [d["answers"]["text"] for d in DOCS],
                                    [NA_PROB[i] for i in ids], threshold=0.5)
    assert exact_t == [1.0, 1.0, 0.0, 1.0]


def test_squadv2_task_end_to_end(online_hub, tmp_path, monkeypatch):  # noqa: F811 - fixture imported from test_eval_hub
    from phiforge.eval import data
    from phiforge.eval.evaluator import evaluate
    from phiforge.lm import cut_at_stop
    from phiforge.lm.base import LM
    from tests.test_eval_hub import write_hub_repo

    root = tmp_path / "hub"
    write_hub_repo(root, "lighteval/squad_v2", {None: {"train": SQUAD_TRAIN, "validation": DOCS}})
    monkeypatch.setattr(data, "hub_location", lambda dataset_id: str(root / dataset_id))
    seen = {}

    class Scripted(LM):
        identity = "scripted"

        def _which(self, ctx):
            last = ctx.rsplit("Question: ", 1)[1]
            return next(d["id"] for d in DOCS if last.startswith(d["question"]))

        def _generate(self, requests, on_result=None):
            out = []
            for i, r in enumerate(requests):
                seen.setdefault("gen", []).append(r)
                out.append(cut_at_stop(PRED[self._which(r.context)] + "\nmore", r.sampling.stop))  # as backends do
                if on_result:
                    on_result(i, out[-1])
            return out

        def _loglikelihood(self, requests, on_result=None):
            out = []
            for i, (ctx, cont) in enumerate(requests):
                assert cont == " unanswerable"
                out.append((math.log(NA_PROB[self._which(ctx)]), False))
                if on_result:
                    on_result(i, out[-1])
            return out

    r = evaluate(Scripted(), ["squadv2"], use_cache=False, log_samples=True)
    m = r["tasks"]["squadv2"]["metrics"]
    rr = 2 * 0.4 / 1.4
    assert m["exact"] == 0.5 and m["f1"] == pytest.approx((2 + rr) / 4)
    assert m["HasAns_exact"] == 0.5 and m["HasAns_f1"] == pytest.approx((1 + rr) / 2)
    assert m["NoAns_exact"] == 0.5 and m["NoAns_f1"] == 0.5
    assert m["best_exact"] == 0.75 and m["best_f1"] == pytest.approx((3 + rr) / 4)
    assert r["n-shot"]["squadv2"] == 2 and all(g.context.count("\n\nAnswer:") == 3 for g in seen["gen"])
    assert r["results"]["squadv2"]["exact,none"] == 0.5
    assert r["samples"]["squadv2"][3]["output"] == " unanswerable"
    assert r["configs"]["squadv2"]["dataset_path"] == "lighteval/squad_v2"
