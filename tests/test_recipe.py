"""The two-stage recipe of `phiforge run` without running it: the stage graph, the exercise split that keeps
held-out templates out of every training set, and the two held-out exercise sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phiforge.data.synth.procedural import HELDOUT_TEMPLATES, TEMPLATES, training_templates
from phiforge.eval.recipe import heldout_exercises
from phiforge.run import load_run_config, plan, stage_exercises


def test_stage_graph_pretrains_then_fine_tunes_then_evaluates_both(tmp_path):
    stages = plan(load_run_config(overrides={"out": str(tmp_path / "r")}))
    names = [s.name for s in stages]
    assert names == ["corpus", "curated", "synth", "textbooks", "exercises", "tokens", "train", "ft-tokens",
                     "finetune", "eval-base", "eval", "report"]
    deps = {s.name: s.deps for s in stages}
    assert deps["tokens"] == ["curated", "exercises", "textbooks"]  # pretraining sees no raw synth shards
    assert deps["finetune"] == ["train", "ft-tokens"] and deps["eval"] == ["finetune"]
    assert deps["eval-base"] == ["train", "exercises"]
    for i, s in enumerate(stages):  # every dependency runs first
        assert all(names.index(d) < i for d in s.deps), s.name


def test_heldout_templates_are_real_and_training_templates_exclude_them():
    assert HELDOUT_TEMPLATES and set(TEMPLATES) >= HELDOUT_TEMPLATES
    assert set(training_templates()) == set(TEMPLATES) - HELDOUT_TEMPLATES


def test_heldout_sets_draw_from_their_own_templates():
    ind = heldout_exercises(60, 0, set())
    gen = heldout_exercises(30, 0, set(), sorted(HELDOUT_TEMPLATES), tag="newtpl")
    assert len(ind) == 60 and len(gen) == 30
    assert not {e.template for e in ind} & HELDOUT_TEMPLATES
    assert {e.template for e in gen} <= HELDOUT_TEMPLATES and len({e.template for e in gen}) > 1
    excluded = heldout_exercises(10, 0, {ind[0].prompt})  # a trained prompt is never a test item
    assert ind[0].prompt not in {e.prompt for e in excluded}


def test_exercise_split_keeps_heldout_templates_out_of_training(tmp_path):
    import random

    from phiforge.data.synth.procedural import python_exercise

    synth = tmp_path / "synth"
    synth.mkdir()
    recs = []
    for i in range(80):  # every template, held-out ones included, as the synth stage makes them
        ex = python_exercise(random.Random(i))
        recs.append({"id": str(i), "key": f"k{i}", "source": "python_exercises", "text": ex.code,
                     "task": {"prompt": ex.prompt, "solution": ex.solution, "template": ex.template}})
    recs.append({"id": "m", "key": "km", "source": "math_problems", "text": "Ava has 3 apples. 3 + 4 = 7."})
    (synth / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    n_heldout = sum(r["task"]["template"] in HELDOUT_TEMPLATES for r in recs[:-1])
    assert n_heldout > 0

    out = tmp_path / "exercises"
    out.mkdir()
    summary = stage_exercises(out, synth)
    ft = [json.loads(line) for line in (out / "finetune.jsonl").read_text().splitlines()]
    assert not {r["template"] for r in ft} & HELDOUT_TEMPLATES
    assert len(ft) == summary["finetune_examples"] == 80 - n_heldout
    assert summary["heldout_template_dropped"] == n_heldout
    assert all(r["prompt"] and r["completion"] for r in ft)
    pre = [json.loads(line) for line in (out / "pretrain.jsonl").read_text().splitlines()]
    assert [r["text"] for r in pre] == ["Ava has 3 apples. 3 + 4 = 7."]


def test_bits_per_byte_by_hand():
    import math

    from phiforge.eval.recipe import bits_per_byte

    # 'ab' and 'é' (2 UTF-8 bytes): 4 bytes; probability 1/2 each -> 2 bits over 4 bytes
    assert bits_per_byte([-math.log(2), -math.log(2)], ["ab", "é"]) == pytest.approx(0.5)
    assert bits_per_byte([-8 * math.log(2)], ["abcd"]) == pytest.approx(2.0)  # p = 1/256 over 4 bytes
    assert bits_per_byte([], []) is None


def test_heldout_stdlib_slice_is_test_suites_the_corpus_skips():
    from phiforge.eval.recipe import heldout_stdlib
    from phiforge.run import stdlib_root

    if not (stdlib_root() / "test").is_dir():
        pytest.skip("this interpreter ships without its test suites")
    texts = heldout_stdlib(5, max_chars=2000)
    assert 0 < len(texts) <= 5 and all(len(t) <= 2000 and t.endswith("\n") for t in texts)


# ------------------------------------------------------------------------------- bits per byte: MBPP


class _BitsLM:
    """A stand-in model with known costs: 3 bits a byte for a continuation after an MBPP prompt ("[BEGIN]"), 1
    bit a byte after any other context, 2 bits a byte for whole texts; it records what it was asked."""

    def __init__(self):
        self.asked = []

    def loglikelihood(self, pairs, on_result=None):
        import math

        out = []
        for i, (ctx, x) in enumerate(pairs):
            self.asked.append((ctx, x))
            out.append((-(3 if "[BEGIN]" in ctx else 1) * len(x.encode()) * math.log(2), False))
            if on_result:
                on_result(i, out[-1])
        return out

    def loglikelihood_rolling(self, texts, on_result=None):
        import math

        return [-2 * len(t.encode()) * math.log(2) for t in texts]


def _only_dirs(monkeypatch, *dirs):
    """Benchmark data is looked for only in `dirs` (not in a developer's shared copy, nor the hub)."""
    import phiforge.eval.data as data

    monkeypatch.delenv("PHIFORGE_BENCHMARKS", raising=False)
    monkeypatch.setattr(data, "search_dirs", lambda data_dir=None: ([Path(data_dir)] if data_dir else []) + list(dirs))


def _mbpp_copy(root):
    """A small MBPP in `phiforge data pull`'s layout: 3 test problems (CRLF solutions, as the release) and the
    prompt split's exemplars."""
    split = root / "google-research-datasets" / "mbpp" / "full"
    split.mkdir(parents=True)
    rows = [{"task_id": 11 + i, "text": f"Write a function to add {i} to a number.",
             "code": f"def add_{i}(x):\r\n    return x + {i}", "test_setup_code": "",
             "test_list": [f"assert add_{i}(1) == {1 + i}", f"assert add_{i}(0) == {i}", f"assert add_{i}(2) == {2 + i}"],
             "challenge_test_list": []} for i in range(3)]
    (split / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shots = [{**rows[0], "task_id": t} for t in (1, 2, 3)]
    (split / "prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shots))
    return rows


def test_mbpp_bits_per_byte_of_reference_solutions_given_their_prompts(tmp_path, monkeypatch):
    from phiforge.eval.recipe import neutral_bits_per_byte

    rows = _mbpp_copy(tmp_path / "bench")
    _only_dirs(monkeypatch)
    lm = _BitsLM()
    data = {}
    bpb = neutral_bits_per_byte(lm, 1, 0, mbpp_limit=2, data_dir=str(tmp_path / "bench"), data=data)
    assert bpb["mbpp_solutions"] == pytest.approx(3.0) and bpb["humaneval_solutions"] == pytest.approx(1.0)
    mbpp = [(c, x) for c, x in lm.asked if "[BEGIN]" in c]
    assert len(mbpp) == 2  # mbpp_limit: the first two test problems
    ctx, sol = mbpp[1]
    # lm-eval's MBPP prompt (no exemplars), then the reference solution with LF line ends
    assert ctx == ("You are an expert Python programmer, and here is your task: Write a function to add 1 to a "
                   "number. Your code should pass these tests:\n\nassert add_1(1) == 2\nassert add_1(0) == 1\n"
                   "assert add_1(2) == 3\n[BEGIN]\n")
    assert sol == rows[1]["code"].replace("\r\n", "\n") and "\r" not in sol
    assert data["mbpp_solutions"].startswith("2 MBPP test problems from") and "bench" in data["mbpp_solutions"]


def test_mbpp_absent_is_recorded_with_the_reason_not_an_error(tmp_path, monkeypatch):
    from phiforge.eval.recipe import neutral_bits_per_byte

    (tmp_path / "empty").mkdir()
    _only_dirs(monkeypatch, tmp_path / "empty")
    data = {}
    bpb = neutral_bits_per_byte(_BitsLM(), 1, 0, data=data)
    assert bpb["mbpp_solutions"] is None and bpb["humaneval_solutions"] == pytest.approx(1.0)
    why = data["mbpp_solutions"]
    assert why.startswith("absent: no MBPP data found") and str(tmp_path / "empty") in why
    assert "phiforge data pull mbpp" in why and "eval.data_dir" in why


def test_mbpp_pairs_from_the_release_file_when_present():
    from phiforge.eval.data import find_local
    from phiforge.eval.recipe import mbpp_pairs

    if find_local("mbpp/mbpp.jsonl") is None:
        pytest.skip("no local MBPP release file (a developer checkout's shared benchmarks)")
    pairs, where = mbpp_pairs(3)
    assert len(pairs) == 3 and where.startswith("3 MBPP test problems from")
    assert "remove first and last occurrence" in pairs[0][0] and pairs[0][0].endswith("[BEGIN]\n")  # task 11
    assert all("\r" not in sol and "def " in sol for _, sol in pairs)
