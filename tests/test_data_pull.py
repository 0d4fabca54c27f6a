"""`phiforge data pull`: the hub's splits into a folder with a manifest of hashes, which `phiforge eval --data-dir`
then reads with no internet; a changed file is refused; a second pull resumes instead of fetching again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.test_eval_hub import ARC_ROWS, datasets_cache, hub_root, online_hub  # noqa: F401 - fixtures

PULL = ["arc_easy", "mmlu", "toxigen", "squadv2", "bbh", "mbpp"]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_pull_then_eval_offline(online_hub, tmp_path, monkeypatch, capsys):  # noqa: F811
    from phiforge.cli import main
    from phiforge.eval.data import rows_sha256
    from phiforge.eval.evaluator import evaluate, prepare
    from phiforge.lm.base import LM

    out = tmp_path / "bench-data"
    assert main(["data", "pull", ",".join(PULL), "--subjects", "anatomy,virology,navigate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"use: phiforge eval --data-dir {out} --tasks {','.join(PULL)}" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    arc = "allenai/ai2_arc/ARC-Easy/test.jsonl"
    assert manifest["files"][arc] == {"dataset": "allenai/ai2_arc", "config": "ARC-Easy", "split": "test", "rows": 3,
                                      "sha256": sha(out / arc), "bytes": (out / arc).stat().st_size}
    assert sha(out / arc) == rows_sha256(ARC_ROWS)  # the pulled file hashes as the hub's rows do
    assert all(sha(out / rel) == f["sha256"] for rel, f in manifest["files"].items())
    assert sorted(manifest["tasks"]["mmlu"]) == [f"cais/mmlu/{s}/{x}.jsonl" for s in ("anatomy", "virology")
                                                 for x in ("dev", "test")]
    assert manifest["tasks"]["squadv2"] == ["lighteval/squad_v2/default/train.jsonl",
                                            "lighteval/squad_v2/default/validation.jsonl"]

    # The cluster node: no internet, no hub, only the folder.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = prepare(PULL, data_dir=out, subjects=["anatomy", "virology", "navigate"])
    assert all(s.kind == "pulled" for d in data.values() for s in d.sources)

    class Constant(LM):
        identity = "constant"

        def _answer(self, values, on_result):
            for i, v in enumerate(values):
                if on_result:
                    on_result(i, v)
            return values

        def _loglikelihood(self, requests, on_result=None):
            return self._answer([(-float(len(c)), False) for _, c in requests], on_result)

        def _loglikelihood_rolling(self, texts, on_result=None):
            return self._answer([-float(len(t)) for t in texts], on_result)

        def _generate(self, requests, on_result=None):
            return self._answer([" France" for _ in requests], on_result)

    r = evaluate(Constant(), PULL, data=data, data_dir=out, use_cache=False, model_spec="constant")
    assert r["configs"]["arc_easy"]["data"][0] == {"kind": "pulled", "where": str(out / arc), "rows": 3,
                                                   "sha256": manifest["files"][arc]["sha256"],
                                                   "dataset": "allenai/ai2_arc", "config": "ARC-Easy",
                                                   "split": "test"}
    assert r["tasks"]["mmlu"]["n"] == 6 and r["tasks"]["squadv2"]["metrics"]["exact"] == pytest.approx(1 / 3)
    assert r["tasks"]["mbpp"]["metrics"]["pass@1"] == 0.0 and r["configs"]["mbpp"]["sandbox"]["mode"]

    # A pulled copy can be read as a hub repository too (its README.md has the configs).
    import datasets

    rows = datasets.load_dataset(str(out / "allenai" / "ai2_arc"), "ARC-Easy", split="test")
    assert [dict(x) for x in rows] == ARC_ROWS

    # Resuming: what is there with the manifest's hash is kept; --force fetches again.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["data", "pull", "arc_easy", "--out", str(out)]) == 0
    assert "allenai/ai2_arc (ARC-Easy, test): up to date (3 rows)" in capsys.readouterr().out
    assert main(["data", "pull", "arc_easy", "--out", str(out), "--force"]) == 0
    assert "allenai/ai2_arc (ARC-Easy, test): 3 rows ->" in capsys.readouterr().out
    assert set(json.loads((out / "manifest.json").read_text())["tasks"]) == set(PULL)  # merged, not replaced


def test_a_changed_pulled_file_is_refused(online_hub, tmp_path, monkeypatch):  # noqa: F811
    from phiforge.errors import DataError
    from phiforge.eval.data import pull_splits
    from phiforge.eval.tasks import get_task

    out = tmp_path / "d"
    pull_splits({"arc_easy": get_task("arc_easy").hub_splits()}, out, log=lambda s: None)
    f = out / "allenai/ai2_arc/ARC-Easy/test.jsonl"
    f.write_text(f.read_text().replace("oxygen", "OXYGEN"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"changed since `phiforge data pull` wrote it .* phiforge data pull --out"):
        get_task("arc_easy").fetch(out)
    # a split that was not pulled is missing (not read from the rest of the dataset's folder)
    with pytest.raises(DataError, match="no data for arc_challenge"):
        get_task("arc_challenge").fetch(out)


def test_pull_needs_the_hub(online_hub, tmp_path, monkeypatch, capsys):  # noqa: F811
    from phiforge.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["data", "pull", "piqa", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data pull needs the hub, but HF_HUB_OFFLINE=1 is set" in err


def test_default_pull_is_every_suite_task():
    from phiforge.commands.data import default_tasks
    from tests.test_eval_hub import SUITE

    assert sorted(default_tasks()) == sorted(SUITE)
