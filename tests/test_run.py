"""`phiforge run`: the whole pipeline end to end on a micro config, stage reuse, failure handling, report."""

from __future__ import annotations

import json

import pytest
from conftest import MICRO_RUN as MICRO

from phiforge.errors import ConfigError, PhiforgeError
from phiforge.run import load_run_config, run


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    cfg = load_run_config(overrides={**MICRO, "out": str(out)})
    logs: list[str] = []
    summaries = run(cfg, log=logs.append)
    return cfg, out, summaries, logs


def test_micro_run_produces_every_stage_and_a_report(micro_run):
    cfg, out, summaries, _ = micro_run
    for stage in ("corpus", "curated", "synth", "textbooks", "exercises", "tokens", "train", "ft-tokens",
                  "finetune", "eval-base", "eval", "report"):
        assert (out / stage / ".stage.json").exists(), stage
    assert summaries["corpus"]["documents"] == 12
    assert summaries["train"]["steps"] == 4
    assert summaries["finetune"]["steps"] == 3
    assert summaries["tokens"]["train_tokens"] > 0
    res = json.loads((out / "eval" / "results.json").read_text())
    assert res["heldout"]["n"] == 3 and 0.0 <= res["heldout"]["pass@1"] <= 1.0
    assert res["val_loss"] > 0
    assert len(res["generations"]) == 1
    base = json.loads((out / "eval-base" / "results.json").read_text())
    assert base["checkpoint"].startswith(str(out / "train")) and res["checkpoint"].startswith(str(out / "finetune"))
    # no training exercise shares a template with the generalization set
    from phiforge.data.synth.procedural import HELDOUT_TEMPLATES

    ft = [json.loads(line) for line in (out / "exercises" / "finetune.jsonl").read_text().splitlines()]
    assert ft and not {r["template"] for r in ft} & HELDOUT_TEMPLATES
    gen = res["heldout_new_templates"]
    assert gen["n"] == 3 and {s["template"] for s in gen["samples"]} <= HELDOUT_TEMPLATES
    assert not {s["template"] for s in res["heldout"]["samples"]} & HELDOUT_TEMPLATES
    assert summaries["ft-tokens"]["train_tokens"] > 0
    bpb = res["bits_per_byte"]  # neutral metrics: finite and positive for both models
    assert 0 < bpb["humaneval_solutions"] < 50 and 0 < base["bits_per_byte"]["humaneval_solutions"] < 50
    html = (out / "report.html").read_text()
    assert "Data funnel" in html and "data:image/png;base64," in html  # figures embedded: opens offline
    assert "http://" not in html and "https://" not in html
    md = (out / "report.md").read_text()
    assert "## Evaluation" in md and "| python |" in md


def test_rerun_reuses_finished_stages(micro_run):
    cfg, out, _, _ = micro_run
    logs: list[str] = []
    run(cfg, log=logs.append)
    reused = [m for m in logs if "up to date" in m]
    assert len(reused) == 11  # everything but the report is reused


def test_changed_train_config_reruns_only_downstream(micro_run):
    cfg, out, _, _ = micro_run
    cfg2 = load_run_config(overrides={**MICRO, "out": str(out), "train": {**MICRO["train"], "max_steps": 5}})
    logs: list[str] = []
    summaries = run(cfg2, log=logs.append)
    redone = {m.split(":")[0].split("] ")[1] for m in logs if m.endswith("...")}
    assert redone == {"train", "finetune", "eval-base", "eval", "report"}  # ft-tokens needs only the tokenizer
    assert summaries["train"]["steps"] == 5


def test_failure_names_the_stage_and_keeps_finished_stages(micro_run, tmp_path):
    cfg, out, _, _ = micro_run
    # a model that does not exist is found only when training starts (a bad key fails at load: test_configio)
    bad = load_run_config(overrides={**MICRO, "out": str(tmp_path / "bad"),
                                     "train": {**MICRO["train"], "model": "no_such_model"}})
    with pytest.raises(PhiforgeError, match="stage 'train' failed.*no_such_model"):
        run(bad, log=lambda m: None)
    assert (tmp_path / "bad" / "tokens" / ".stage.json").exists()
    assert not (tmp_path / "bad" / "train" / ".stage.json").exists()


def test_config_error_in_train_fails_before_any_stage(tmp_path):
    with pytest.raises(ConfigError, match="train: unknown key.*no_such_key"):
        load_run_config(overrides={**MICRO, "out": str(tmp_path / "bad"),
                                   "train": {**MICRO["train"], "no_such_key": 1}})


def test_unknown_run_config_key_is_an_error(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="trian"):
        load_run_config(p)


def test_report_command_rebuilds(micro_run):
    from phiforge.cli import main

    _, out, _, _ = micro_run
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").exists()
