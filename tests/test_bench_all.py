"""bench/all.py's table logic: reading a bench's output, the table block, and merging a partial run into a table
built earlier (no bench runs here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ball():
    spec = importlib.util.spec_from_file_location("bench_all", ROOT / "bench" / "all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MACHINE = {"cpu": "AMD EPYC, family 25 model 1, AVX2", "cores": 2, "threads": 2, "torch": "2.13.0+cpu",
           "bandwidth_mib": 1024, "read_gb_s": 11.4, "fp32_mkl_gflops": 30.2, "fp32_onednn_gflops": 69.0,
           "bf16_gflops": 0.72}


def row_line(workload: str, ours: float, theirs: float, **kw) -> str:
    r = {"workload": workload, "peer": "a peer", "peer_setting": "its best", "ours": ours, "theirs": theirs,
         "unit": "tok/s", "ratio": ours / theirs, "ratio_unit": "x", "goal": "> 1x", "held": "", "note": ""}
    return "ROW " + json.dumps({**r, **kw})


def fake_run(ball, name: str, text: str, status: str = "exit 0", seconds: float = 90.0) -> dict:
    return {"name": name, "status": status, "seconds": seconds, **ball.parse_log(text)}


def lines_of(ball, runs: list[dict], date: str = "2026-12-05", quick: bool = False) -> dict:
    return {r["name"]: ball.bench_lines(r, MACHINE, date, "python bench/all.py", quick) for r in runs}


def test_parse_log_reads_rows_held_results_and_survives_a_torn_row(ball):
    text = "\n".join([
        "some progress\rLoading 100%",
        "held equal: same threads",
        "RESULT dedup_ratio 3.96 x",
        row_line("near-duplicate detection", 2774.0, 701.0, note="recall 1.0"),
        'ROW {"workload": "torn", "peer": ',  # a line cut short by a crash must not cost the other rows
        'ROW {"workload": "no figures"}',
        "skipped: no data",
    ])
    out = ball.parse_log(text)
    assert [r["workload"] for r in out["rows"]] == ["near-duplicate detection"]
    assert out["held"] == ["same threads"]
    assert out["results"] == {"dedup_ratio": "3.96 x"}
    assert out["skipped"] == "no data"
    assert out["bad"] == 2


@pytest.mark.parametrize("ratio, unit, cell", [
    (2.5, "x", "2.50x"), (3.04, "x faster", "3.04x faster"), (1.1, "x (lower is better)", "1.10x (lower is better)"),
    (-0.25, "pt", "-0.2 pt"), (0.31, "points (lower is better)", "+0.31 points (lower is better)"), (None, "x", "—")])
def test_ratio_cell_keeps_each_rows_unit(ball, ratio, unit, cell):
    assert ball.ratio_cell({"ratio": ratio, "ratio_unit": unit}) == cell


def test_block_round_trips_and_keeps_a_pipe_inside_a_cell(ball):
    runs = [fake_run(ball, "dedup", "held equal: corpus\n" + row_line("dedup", 2.0, 1.0, note="recall 1.0")),
            fake_run(ball, "eval_faithfulness", row_line("faithfulness", 50.0, 50.0, goal="|Δ| ≤ 1 pt", ratio=0.0,
                                                         ratio_unit="pt"))]
    lines = lines_of(ball, runs)
    block = ball.render_block(lines, placeholders=False)
    assert ball.parse_block(block) == lines
    (faith,) = [ln for ln in block.splitlines() if ln.startswith("| eval_faithfulness ")]
    assert "\\|Δ\\| ≤ 1 pt" in faith and faith.count(" | ") == len(ball.HEAD) - 1


def test_merge_replaces_only_the_benches_it_ran(ball):
    first = [fake_run(ball, "dedup", "held equal: corpus A\n" + row_line("dedup", 3.0, 1.0, note="old note")),
             fake_run(ball, "train", row_line("train engine only", 2.0, 1.0) + "\n" + row_line("train total", 4, 1))]
    doc = "# Performance\n\nintro\n\n" + ball.render_block(lines_of(ball, first, "2026-12-01"), placeholders=True) \
        + "\n## After\n\nkept text\n"
    before = ball.parse_block(ball.split_doc(doc)[1])
    second = [fake_run(ball, "train", "held equal: batches\n" + row_line("train engine only", 5.0, 1.0))]
    text, kept = ball.merge(doc, second, lines_of(ball, second, "2026-12-05"))
    assert kept == []
    assert text.startswith("# Performance\n\nintro\n\n") and text.endswith("## After\n\nkept text\n")
    after = ball.parse_block(ball.split_doc(text)[1])
    assert after["dedup"] == before["dedup"]  # untouched, date and all
    assert len(after["train"]["rows"]) == 1 and "5.00x" in after["train"]["rows"][0]
    assert "2026-12-05" in after["train"]["rows"][0] and "2026-12-01" in after["dedup"]["rows"][0]
    assert after["train"]["held"] == ["- **train**: batches"]
    # the benches never measured have a placeholder row, in run order
    rows = [ln.split("|")[1].strip() for ln in ball.split_doc(text)[1].splitlines() if ln.startswith("| ")][1:]
    assert rows == list(ball.BENCHES)
    assert text.count(ball.PLACEHOLDER) == len(ball.BENCHES) - 2
    # merging nothing changes nothing
    assert ball.merge(text, [], {})[0] == text


def test_a_failed_bench_keeps_its_previous_rows(ball):
    good = [fake_run(ball, "serve", row_line("serve fp32", 40.0, 20.0))]
    doc = ball.render_block(lines_of(ball, good, "2026-12-01"), placeholders=True)
    bad = [fake_run(ball, "serve", row_line("serve fp32", 1.0, 20.0), status="timed out after 7200s"),
           fake_run(ball, "grow", "Traceback ...", status="exit 1"),
           fake_run(ball, "eval_faithfulness", "skipped: benchmark files not found")]
    text, kept = ball.merge(doc, bad, lines_of(ball, bad))
    assert ball.split_doc(text)[1] == ball.split_doc(doc)[1]
    assert kept == ["serve: timed out after 7200s; kept its previous lines", "grow: exit 1; kept its placeholder",
                    "eval_faithfulness: skipped: benchmark files not found; kept its placeholder"]


def test_merge_into_a_file_without_a_block_appends_one(ball):
    runs = [fake_run(ball, "dedup", row_line("dedup", 2.0, 1.0))]
    text, _ = ball.merge("# Title\n\nhand-written text\n", runs, lines_of(ball, runs))
    assert text.startswith("# Title\n\nhand-written text\n\n" + ball.BEGIN)
    assert ball.merge("", runs, lines_of(ball, runs))[0].startswith(ball.BEGIN)


def test_plan_uses_the_last_full_size_run_and_ignores_quick_ones(ball):
    runs = [fake_run(ball, "dedup", row_line("dedup", 2.0, 1.0), seconds=300),
            fake_run(ball, "grow", row_line("grow", 2.0, 1.0), seconds=60)]
    doc = ball.render_block(lines_of(ball, runs[:1], "2026-12-02"), placeholders=True)
    text, _ = ball.merge(doc, runs[1:], lines_of(ball, runs[1:], quick=True))
    rec = ball.recorded_minutes(text)
    assert rec == {"dedup": (5.0, "2026-12-02")}
    out = ball.plan(["dedup", "grow"], rec)
    assert "dedup" in out and "~   5 min (its full run on 2026-12-02)" in out
    assert f"~{ball.FULL_MINUTES['grow']:4.0f} min (estimate)" in out
    assert set(ball.FULL_MINUTES) == set(ball.BENCHES)


def test_quick_rows_say_so(ball):
    runs = [fake_run(ball, "dedup", row_line("dedup", 2.0, 1.0))]
    sec = lines_of(ball, runs, quick=True)["dedup"]
    assert "2026-12-05 (quick)" in sec["rows"][0] and "quick size, figures meaningless" in sec["runs"][0]


def test_cli_refuses_quick_figures_in_docs_and_unknown_benches(ball, monkeypatch, capsys):
    for argv in (["--quick", "--merge", "docs/performance.md"], ["--only", "nosuch"]):
        monkeypatch.setattr(sys, "argv", ["bench/all.py", *argv])
        with pytest.raises(SystemExit) as e:
            ball.main()
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not merged into docs/performance.md" in err and "unknown bench nosuch" in err


def test_cli_plan_runs_nothing(ball, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["bench/all.py", "--plan", "--only", "dedup,laptop",
                                      "--merge", str(tmp_path / "absent.md"), "--logs", str(tmp_path / "logs")])
    assert ball.main() == 0
    out = capsys.readouterr().out
    assert "dedup" in out and "laptop" in out and "llama.cpp" in out and "total" in out
    assert not (tmp_path / "logs").exists()


def test_results_file_keeps_each_benchs_latest_run(ball, tmp_path):
    path = tmp_path / "results.json"
    path.write_text("not json")  # a damaged file is replaced, not fatal
    ball.write_results(path, [{"name": "dedup", "machine": MACHINE, "results": {"a": "1 x"}},
                              {"name": "grow", "machine": MACHINE, "results": {"b": "2 x"}}])
    ball.write_results(path, [{"name": "grow", "machine": MACHINE, "results": {"b": "3 x"}}])
    runs = {r["name"]: r["results"] for r in json.loads(path.read_text())["runs"]}
    assert runs == {"dedup": {"a": "1 x"}, "grow": {"b": "3 x"}}
