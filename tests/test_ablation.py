"""`phiforge run --ablate`: four arms one factor at a time, at equal steps and tokens, seeds, intervals, tests."""

from __future__ import annotations

import json
import math

import pytest
from conftest import MICRO_RUN

from phiforge.errors import PhiforgeError
from phiforge.eval.stats import holm, mean_ci, paired_diff
from phiforge.run import ABLATION_ARMS, ABLATION_METRICS, load_run_config, plan, run, write_ablation

MICRO = {**MICRO_RUN, "ablate": {"enabled": True, "seeds": 2},
         "train": {**MICRO_RUN["train"], "max_steps": 3, "eval_every": 3, "save_every": 3},
         "finetune": {**MICRO_RUN["finetune"], "max_steps": 2, "eval_every": 2, "save_every": 2},
         "eval": {**MICRO_RUN["eval"], "samples": []}}


# ------------------------------------------------------------------------------------------- statistics


def test_mean_ci_is_the_student_t_interval():
    ci = mean_ci([1.0, 2.0, 3.0])
    # sd = 1, t(0.975, 2) = 4.302653, half-width = 4.302653 / sqrt(3)
    assert ci["mean"] == 2.0 and ci["n"] == 3
    assert ci["hi"] - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert ci["lo"] == pytest.approx(4.0 - ci["hi"])
    assert mean_ci([0.5]) == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 1}
    assert mean_ci([None, None])["mean"] is None and mean_ci([None, 1.0, 3.0])["n"] == 2


def test_paired_diff_is_the_paired_t_test():
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.4641, two-sided p with 2 df = 0.07418
    r = paired_diff([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert r["diff"] == 2.0 and r["n"] == 3 and r["p"] == pytest.approx(0.07418, abs=1e-4)
    same = paired_diff([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])  # no spread and no difference: nothing to see
    assert same["diff"] == 0.0 and same["p"] == 1.0
    assert paired_diff([0.0, 0.25, 0.5], [0.5, 0.75, 1.0])["p"] == 0.0  # every seed moved by the same 0.5
    assert paired_diff([1.0], [2.0])["p"] is None  # one pair: no test


def test_holm_steps_down():
    # m = 3: thresholds 0.05/3, 0.05/2, 0.05/1 for the sorted p-values; stops at the first failure
    assert holm([0.01, 0.04, 0.03]) == [True, False, False]
    assert holm([0.001, 0.02, 0.04]) == [True, True, True]
    assert holm([None, 0.2]) == [None, False]


# ------------------------------------------------------------------------------------------- stage graph


def test_ablation_stage_graph_isolates_one_factor_per_arm(tmp_path):
    cfg = load_run_config(overrides={**MICRO, "out": str(tmp_path / "r"), "ablate": {"enabled": True, "seeds": 3}})
    stages = plan(cfg)
    by = {s.name: s for s in stages}
    names = [s.name for s in stages]
    for i, s in enumerate(stages):  # every dependency runs first
        assert all(names.index(d) < i for d in s.deps), s.name
    assert names[-2:] == ["ablation", "report"] and "ablation" in by["report"].deps
    # the run's own base and fine-tune are the seed-0 arms (not trained twice)
    assert not {"ablate/seed-0/base-pretrain", "ablate/seed-0/finetuned-pretrain", "ablate/seed-0/finetuned-continue",
                "ablate/seed-0/finetuned-eval"} & set(by)
    assert by["ablate/seed-0/base-continue"].deps == ["train", "tokens"]
    for seed in (1, 2):
        p = f"ablate/seed-{seed}"
        # every pretraining arm trains on its own data; the fine-tuned arm continues its seed's base pretraining
        assert by[f"{p}/raw-pretrain"].deps == ["tokens-raw"]
        assert by[f"{p}/curated-pretrain"].deps == ["tokens-curated"]
        assert by[f"{p}/base-pretrain"].deps == ["tokens"]
        assert by[f"{p}/base-continue"].deps == [f"{p}/base-pretrain", "tokens"]
        assert by[f"{p}/finetuned-continue"].deps == [f"{p}/base-pretrain", "ft-tokens"]
        assert f"{p}/finetuned-pretrain" not in by
        for arm, _, _ in ABLATION_ARMS:  # same train and continuation sections for every arm: only data differs
            ev = by[f"{p}/{arm}-eval"]
            assert ev.config == by["eval"].config
        assert {by[f"{p}/{a}-pretrain"].config["seed"] for a in ("raw", "curated", "base")} == {seed}
        assert len({json.dumps(by[f"{p}/{a}-pretrain"].config, sort_keys=True)
                    for a in ("raw", "curated", "base")}) == 1
        assert len({json.dumps(by[f"{p}/{a}-continue"].config, sort_keys=True)
                    for a in ("raw", "curated", "base", "finetuned")}) == 1
    assert by["tokens-raw"].deps == ["corpus", "tokens"] and by["tokens-curated"].deps == ["curated", "tokens"]


def test_ablation_is_off_by_default_and_seed_count_is_checked(tmp_path):
    names = [s.name for s in plan(load_run_config(overrides={"out": str(tmp_path / "r")}))]
    assert "ablation" not in names and not any(n.startswith("ablate/") for n in names)


def test_unequal_arms_are_refused(tmp_path):
    cfg = load_run_config(overrides={**MICRO, "out": str(tmp_path / "r")})
    summaries = {s.name: {"steps": 5, "tokens": 100, "checkpoint": "x", **dict.fromkeys(ABLATION_METRICS, 0.5)}
                 for s in plan(cfg)}
    summaries["ablate/seed-1/raw-pretrain"]["tokens"] = 90  # one arm saw fewer tokens
    with pytest.raises(PhiforgeError, match="unequal amounts"):
        write_ablation(tmp_path, cfg, summaries)


# ------------------------------------------------------------------------------------------- a micro ablation


@pytest.fixture(scope="module")
def micro_ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("abl") / "r"
    cfg = load_run_config(overrides={**MICRO, "out": str(out)})
    summaries = run(cfg, log=lambda m: None)
    return cfg, out, summaries


def test_micro_ablation_trains_every_arm_equally_and_writes_intervals(micro_ablation):
    cfg, out, summaries = micro_ablation
    doc = json.loads((out / "ablation.json").read_text())
    assert doc["seeds"] == [0, 1] and [a["name"] for a in doc["arms"]] == [a for a, _, _ in ABLATION_ARMS]
    per_step_pre = 3 * 4 * 64  # steps x micro_batch x seq_len
    per_step_ft = 2 * 4 * 64
    assert doc["tokens_per_arm"] == per_step_pre + per_step_ft and doc["steps"] == 5
    for arm in doc["arms"]:
        assert [r["seed"] for r in arm["runs"]] == [0, 1]
        for r in arm["runs"]:  # the equal-token accounting comes from what training actually did
            assert r["tokens"] == doc["tokens_per_arm"] and r["steps"] == 5
            assert r["metrics"]["val_loss"] > 0 and 0.0 <= r["metrics"]["heldout_pass@1"] <= 1.0
        s = arm["summary"]["val_loss"]
        vals = [r["metrics"]["val_loss"] for r in arm["runs"]]
        assert s["n"] == 2 and s["lo"] <= s["mean"] <= s["hi"] and s["mean"] == pytest.approx(sum(vals) / 2)
    # seeds differ (initialisation and data order), so the arms' runs differ
    raw = doc["arms"][0]["runs"]
    assert raw[0]["metrics"]["val_loss"] != raw[1]["metrics"]["val_loss"]
    pairs = {(c["a"], c["b"]) for c in doc["comparisons"]}
    assert pairs == {("raw", "curated"), ("curated", "base"), ("base", "finetuned")}
    assert all(isinstance(c["significant"], bool) for c in doc["comparisons"] if c["p"] is not None)
    assert doc["total_seconds"] > 0 and "one factor at a time" in doc["design"]
    # the seed-0 fine-tuned arm is the default run's fine-tuned model, evaluated once
    ft0 = json.loads((out / "eval" / "results.json").read_text())
    assert doc["arms"][3]["runs"][0]["metrics"]["val_loss"] == ft0["val_loss"]
    assert summaries["ablation"]["tokens_per_arm"] == doc["tokens_per_arm"]
