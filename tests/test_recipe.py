"""The two-stage recipe of `phiforge run` without running it: the stage graph, the exercise split that keeps
held-out templates out of every training set, and the two held-out exercise sets."""

from __future__ import annotations

import json

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


def test_ablate_raw_adds_its_arm(tmp_path):
    names = [s.name for s in plan(load_run_config(overrides={"out": str(tmp_path / "r"), "ablate": ["raw"]}))]
    assert names.index("tokens-raw") < names.index("eval") < names.index("train-raw") < names.index("eval-raw")


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
