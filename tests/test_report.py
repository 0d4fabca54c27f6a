"""The run report: a small run directory's results rendered as HTML and Markdown, headline numbers and sections
in both, figures embedded (HTML) or beside it (Markdown), and the ablation's second column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phiforge.errors import PhiforgeError
from phiforge.report import build_report

SECTIONS = ("Data funnel", "Educational-value scores", "Synthetic data", "Training", "Evaluation",
            "Held-out exercise samples", "Sample generations (greedy)", "Configuration", "Versions")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def small_run(root: Path, ablation: bool = False) -> Path:
    """What a finished `phiforge run` leaves behind, in miniature."""
    from phiforge.run import default_run_config

    write_json(root / "run_config.json", default_run_config())
    for stage, summary in {"corpus": {"documents": 12, "seconds": 1.5}, "synth": {"kept": 40, "pass_rate": 0.75},
                           "textbooks": {"skipped": "n = 0"}, "tokens": {"train_tokens": 4321, "val_tokens": 87},
                           "train": {"steps": 4, "tokens": 1024, "seconds": 2.0}}.items():
        write_json(root / stage / ".stage.json", {"hash": "x", "summary": summary})
    write_json(root / "curated" / "stats.json", {
        "documents_in": 12, "documents_out": 9, "bad_records": 0,
        "steps": [{"step": "python", "type": "python", "input": 12, "kept": 10, "removed": {"syntax_error": 2}},
                  {"step": "exact_dedup", "type": "exact_dedup", "input": 10, "kept": 9,
                   "removed": {"exact_duplicate": 1}}]})
    write_json(root / "curated" / "stats" / "02-edu.json", {"scores": [0.5, 2.25, 3.0, 4.5], "threshold": 2})
    (root / "train" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"type": "train", "step": 1, "loss": 5.0}, {"type": "train", "step": 2, "loss": 4.0},
        {"type": "eval", "step": 2, "val_loss": 4.5}]))
    results = {"val_loss": 2.345678, "heldout": {"n": 3, "passed": 1, "pass@1": 1 / 3, "samples": [
        {"template": "add_numbers", "passed": True, "prompt": "def add(a, b):\n", "completion": "    return a < b\n"}]},
        "humaneval": {"metrics": {"pass@1": 0.125, "pass@1_stderr": 0.05}},
        "generations": [{"prompt": "def fibonacci(n):\n", "completion": "    return n"}]}
    write_json(root / "eval" / "results.json", results)
    if ablation:
        write_json(root / "eval-raw" / "results.json", {**results, "val_loss": 3.5, "val_loss_other": 2.75,
                                                         "humaneval": {"metrics": {"pass@1": 0.0}}})
        write_json(root / "eval" / "results.json", {**results, "val_loss_other": 4.25})
    return root


def test_report_has_the_headline_numbers_and_every_section(tmp_path):
    paths = build_report(small_run(tmp_path / "run"))
    html, md = paths["html"].read_text(), paths["markdown"].read_text()
    for section in SECTIONS:
        assert f">{section}" in html and f"# {section}" in md, section
    for text in (html, md):
        assert "2.346" in text  # validation loss
        assert "0.333 (1/3)" in text  # held-out pass@1 (passed/n)
        assert "0.125" in text  # HumanEval pass@1
        assert "0.083" in text  # duplicate rate: 1 of 12 documents
        assert "4321" in text and "add_numbers: passed" in text
    assert "| python | 12 | 10 | 2 | syntax_error: 2 |" in md
    assert "<td>python</td><td>12</td><td>10</td><td>2</td><td>syntax_error: 2</td>" in html
    assert "return a &lt; b" in html and "return a < b" in md  # code is escaped in HTML only
    assert '"decontaminate"' in md  # the configuration as run
    # two figures (edu histogram, loss curves): embedded in the HTML, files beside the Markdown
    assert html.count("data:image/png;base64,") == 2 and "http://" not in html and "https://" not in html
    assert (tmp_path / "run" / "report-assets" / "edu.png").stat().st_size > 0
    assert "](report-assets/loss.png)" in md


def test_report_puts_the_ablation_beside_the_main_arm(tmp_path):
    md = build_report(small_run(tmp_path / "run", ablation=True))["markdown"].read_text()
    assert "| metric | fine-tuned on exercises | raw stdlib (ablation) |" in md
    assert "| validation loss (the raw arm's val set) | 4.250 | 2.750 |" in md
    assert "| HumanEval pass@1 (greedy) | 0.125 | 0.000 |" in md


def test_report_shows_base_and_fine_tuned_side_by_side(tmp_path):
    root = small_run(tmp_path / "run")
    gen = {"n": 4, "passed": 1, "pass@1": 0.25, "samples": [
        {"template": "caesar", "passed": False, "prompt": "def shift(s):\n", "completion": "    return s\n"}]}
    res = json.loads((root / "eval" / "results.json").read_text())
    write_json(root / "eval" / "results.json", {**res, "heldout_new_templates": gen})
    write_json(root / "eval-base" / "results.json", {
        **res, "val_loss": 2.5, "heldout": {"n": 3, "passed": 0, "pass@1": 0.0},
        "heldout_new_templates": {"n": 4, "passed": 0, "pass@1": 0.0}, "humaneval": {"metrics": {"pass@1": 0.0}}})
    write_json(root / "exercises" / ".stage.json", {"hash": "x", "finished": "2", "summary": {
        "finetune_examples": 77, "heldout_template_dropped": 9, "heldout_templates": ["caesar", "chunk"],
        "seconds": 0.5}})
    write_json(root / "finetune" / ".stage.json", {"hash": "x", "finished": "3", "summary": {
        "steps": 3, "tokens": 96, "checkpoint": "r/finetune/checkpoints/step-000003", "seconds": 12.25}})
    md = build_report(root)["markdown"].read_text()
    assert "| metric | base (pretrained) | fine-tuned on exercises |" in md
    assert "| validation loss (pretraining val split) | 2.500 | 2.346 |" in md
    assert ("| held-out exercises pass@1: training templates, new seeds (in-distribution) | 0.000 (0/3) | "
            "0.333 (1/3) |") in md
    assert ("| held-out exercises pass@1: templates held out of training (generalization) | 0.000 (0/4) | "
            "0.250 (1/4) |") in md
    assert "caesar, chunk: generalization" in md and "caesar (held-out template): failed" in md
    assert "| finetune | 12.2 |" in md or "| finetune | 12.3 |" in md  # per-stage times
    assert "| fine-tuning examples (training templates) | 77 |" in md
    assert "phiforge chat --model r/finetune/checkpoints/step-000003" in md
    assert "the same tokens for every model" in md  # the one definition of validation loss


def test_report_of_a_directory_that_is_no_run(tmp_path):
    with pytest.raises(PhiforgeError, match="no run_config.json"):
        build_report(tmp_path)
    with pytest.raises(PhiforgeError, match="no such run directory"):
        build_report(tmp_path / "missing")
