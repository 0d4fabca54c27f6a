"""Benchmark decontamination: texts from the task registry, the n-gram index, and the curate step that removes
documents sharing a 13-gram with a benchmark item (and keeps the rest)."""

from __future__ import annotations

import json

import pytest

from phiforge.data.curate.decontam import NgramIndex, benchmark_texts, normalize
from tests.test_curate_filters import PROSE


def test_humaneval_from_package_and_index_hits():
    items = list(benchmark_texts(["humaneval"]))
    assert len(items) == 164 and items[0][:2] == ("humaneval", "HumanEval/0")
    index = NgramIndex.build(items, 13)
    leaked = "Some training file.\n" + items[0][2] + "\n# end"
    clean = PROSE
    hits = index.hits([leaked, clean, "short"])
    assert ("humaneval", "HumanEval/0") in hits[0]
    assert hits[1] == [] and hits[2] == []


def test_local_benchmark_dir_and_missing_noted(tmp_path):
    d = tmp_path / "bench" / "mbpp"
    d.mkdir(parents=True)
    item = {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given "
            "character from the string and return what is left over", "code": "def f(s, ch): return s"}
    (d / "mbpp.jsonl").write_text(json.dumps(item) + "\n")
    missing: list[str] = []
    got = list(benchmark_texts(["mbpp", "gsm8k"], data_dir=tmp_path / "bench", missing=missing))
    assert [(b, i) for b, i, _ in got[:1]] == [("mbpp", "11")]
    # gsm8k is absent from this directory; it is found only if a shared benchmark dir exists
    assert "gsm8k" in missing or any(b == "gsm8k" for b, _, _ in got)
    index = NgramIndex.build([g for g in got if g[0] == "mbpp"], 13)
    doc = "Exercise: " + normalize(item["text"]).upper()  # case and punctuation do not matter
    assert index.hits([doc]) == [[("mbpp", "11")]]


# ---- the registry answers: which texts, from where ---------------------------------------------------------------
def test_texts_are_the_tasks_own(tmp_path):
    from phiforge.eval.tasks import get_task

    (tmp_path / "arc").mkdir()
    rows = [{"query": "Question: Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"], "gold": 1},
            {"query": "Question: What melts ice?", "choices": ["heat", "cold"], "gold": 0}]
    (tmp_path / "arc" / "arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = list(benchmark_texts(["arc_easy"], data_dir=tmp_path))
    assert got == [("arc_easy", i, t) for i, t in get_task("arc_easy").decontamination_texts(tmp_path)]
    # every string of a record (prompt, choices, answer; numbers as text), by position in the file
    assert got[0] == ("arc_easy", "0", "Question: Which gas do plants take in?\noxygen\ncarbon dioxide\n1")


def test_several_files_prefix_ids_and_canaries_are_skipped(tmp_path):
    (tmp_path / "bbh" / "bbh").mkdir(parents=True)
    for t in ("navigate", "snarks"):
        (tmp_path / "bbh" / "bbh" / f"{t}.json").write_text(json.dumps(
            {"canary": "BENCHMARK DATA SHOULD NEVER APPEAR", "examples": [{"input": f"{t} q", "target": "Yes"}]}))
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").write_text("question,A,B,C,D,answer\nQ1,a,b,c,d,A\n")
    got = list(benchmark_texts(["bbh", "bbh_snarks", "mmlu"], data_dir=tmp_path))
    assert got == [("bbh", "navigate/0", "navigate q\nYes"), ("bbh", "snarks/0", "snarks q\nYes"),
                   ("bbh_snarks", "0", "snarks q\nYes"), ("mmlu", "1", "Q1\na\nb\nc\nd\nA")]


def test_unknown_and_unscored_benchmarks(tmp_path, monkeypatch):
    from phiforge.eval import data

    with pytest.raises(ValueError, match="unknown benchmark 'nosuch'.*truthfulqa"):
        list(benchmark_texts(["nosuch"]))
    monkeypatch.setattr(data, "search_dirs", lambda d=None: [tmp_path])
    missing: list[str] = []
    assert list(benchmark_texts(["truthfulqa", "gsm8k"], missing=missing)) == []
    assert missing == ["truthfulqa", "gsm8k"]
    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "TruthfulQA.csv").write_text("Type,Question,Best Answer\nx,Why?,Because.\n")
    assert list(benchmark_texts(["truthfulqa"])) == [("truthfulqa", "1", "x\nWhy?\nBecause.")]


def test_decontamination_asks_the_registry(monkeypatch):
    """A benchmark is whatever the registry says: a task added there is decontaminated against, no other table."""
    from phiforge.eval import tasks
    from phiforge.eval.tasks.base import Task

    class Planted(Task):
        def decontamination_texts(self, data_dir=None):
            return iter([("p/0", LEAK)])

    real = tasks.all_tasks
    monkeypatch.setattr(tasks, "all_tasks", lambda: {**real(), "planted": Planted("planted", "1", "code", "", ())})
    assert list(benchmark_texts(["planted"])) == [("planted", "p/0", LEAK)]


# ---- the curate step: a planted benchmark n-gram is removed, a clean document kept --------------------------------
LEAK = ("Write a function to find the shared elements from the given two lists and return them sorted in "
        "ascending order without duplicates")


def test_curate_removes_a_planted_benchmark_item_and_keeps_clean_text(tmp_path):
    from phiforge.data.curate.pipeline import parse_config, run_curate

    bench = tmp_path / "bench" / "mbpp"
    bench.mkdir(parents=True)
    (bench / "mbpp.jsonl").write_text(json.dumps({"task_id": 2, "text": LEAK, "code": "def f(a, b): pass"}) + "\n")
    (tmp_path / "in.jsonl").write_text(
        json.dumps({"id": "leak", "text": "Homework. " + LEAK.upper() + "! Good luck."}) + "\n"
        + json.dumps({"id": "clean", "text": PROSE}) + "\n")
    cfg = parse_config({"workers": 1, "steps": [
        {"type": "decontaminate", "benchmarks": ["mbpp"], "data_dir": str(tmp_path / "bench")}]})
    summary = run_curate(cfg, [str(tmp_path / "in.jsonl")], tmp_path / "out", log=lambda m: None)
    kept = [json.loads(line)["id"] for line in (tmp_path / "out" / "in.jsonl").open()]
    assert kept == ["clean"] and summary["documents_out"] == 1
    report = json.loads((tmp_path / "out" / "decontamination.json").read_text())
    assert report["hits"] == {"leak": [["mbpp", "2"]]} and report["benchmarks_used"] == ["mbpp"]
    assert report["benchmarks_missing"] == [] and report["items"] == 1
