"""The run's corpus from anywhere (phiforge/data/corpus.py): local Parquet read by record batches into bounded
shards, JSONL and text globs, a Hugging Face dataset streamed from a local repository in the hub's layout, bad
records named and counted, resuming after the last finished shard, and the run's corpus stage feeding curation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phiforge.data import corpus as corpus_mod
from phiforge.data.corpus import CorpusSource, write_corpus
from phiforge.errors import ConfigError, PhiforgeError
from tests.test_eval_hub import datasets_cache, write_hub_repo  # noqa: F401 - a fixture


def _doc(i: int) -> str:
    return f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n    return x + {i}\n"


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _written(d: Path) -> list[dict]:
    return [r for p in sorted(d.glob("*.jsonl")) for r in _lines(p)]


@pytest.fixture
def parquet(tmp_path) -> Path:
    """2,500 rows in row groups of 400 (read batch by batch); every 97th row has no text (a bad record)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"doc_id": f"d{i}", "content": None if i % 97 == 5 else _doc(i), "stars": i} for i in range(2500)]
    path = tmp_path / "in" / "code.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=400)
    return path


def test_parquet_by_record_batches_into_bounded_shards(parquet, tmp_path, capsys):
    src = CorpusSource(path=str(parquet.parent / "*.parquet"), text_field="content", id_field="doc_id")
    out = tmp_path / "corpus"
    summary = write_corpus(out, [src], max_chars=0, shard_docs=1000)
    bad = [i for i in range(2500) if i % 97 == 5]
    assert summary["documents"] == 2500 - len(bad) and summary["bad_records"] == len(bad)
    shards = sorted(out.glob("*.jsonl"))
    assert [p.name for p in shards] == ["in-00000.jsonl", "in-00001.jsonl", "in-00002.jsonl"]
    assert [len(_lines(p)) for p in shards] == [1000, 1000, 2500 - len(bad) - 2000]
    recs = _written(out)
    assert [r["id"] for r in recs] == [f"d{i}" for i in range(2500) if i not in bad]  # input order, ids kept
    assert recs[0] == {"id": "d0", "text": _doc(0)}  # normalised to the curation's default fields
    # bad records: named with FILE:ROW on stderr and in the summary, and counted
    err = capsys.readouterr().err
    assert f"{parquet}:{bad[0] + 1}: missing or non-string field 'content'" in err
    assert summary["bad_examples"][0].startswith(f"{parquet}:{bad[0] + 1}:")
    assert summary["sources"][0]["shards"] == 3


def test_jsonl_and_text_globs_with_a_limit_and_bad_lines(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"body": _doc(i)}) for i in range(30)]
    lines[3] = "{not json"
    lines[7] = json.dumps({"title": "no body"})
    (data / "a.jsonl").write_text("\n".join(lines) + "\n")
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "one.md").write_text("# One\n" + "word " * 50)
    (notes / "sub" / "two.md").write_text("# Two\n" + "more " * 50)
    (notes / "sub" / "bad.md").write_bytes(b"\xff\xfe not utf-8")
    sources = [CorpusSource(path=str(data / "*.jsonl"), text_field="body", limit=20),
               CorpusSource(path=[str(notes / "*.md"), str(notes / "**" / "*.md")], label="notes")]
    out = tmp_path / "corpus"
    summary = write_corpus(out, sources, max_chars=100, shard_docs=8)
    per = {s["label"]: s for s in summary["sources"]}
    assert per["data"]["documents"] == 20 and per["data"]["bad_records"] == 2  # the limit counts documents
    assert per["notes"]["documents"] == 2 and per["notes"]["bad_records"] == 1  # a text file is one document
    recs = _lines(out / "data-00000.jsonl") + _lines(out / "data-00001.jsonl") + _lines(out / "data-00002.jsonl")
    assert len(recs) == 20 and recs[3]["id"] == f"{data / 'a.jsonl'}:5"  # FILE:LINE when no id field is named
    notes_recs = _written(out)[-2:]
    assert [Path(r["id"]).name for r in notes_recs] == ["one.md", "two.md"]
    assert all(len(r["text"]) <= 100 for r in _written(out))  # max_chars cuts every document
    err = capsys.readouterr().err
    assert f"{data / 'a.jsonl'}:4:" in err and "missing or non-string field 'body'" in err and "bad.md" in err


def test_a_hub_dataset_streamed_from_a_local_repository(tmp_path, monkeypatch, datasets_cache):  # noqa: F811
    """The code that reads the hub (datasets.load_dataset(..., streaming=True)), on a repository in the hub's
    layout built here: a named subset, a split, the text and id fields, a document limit."""
    rows = [{"hexsha": f"h{i}", "content": _doc(i), "lang": "Python"} for i in range(120)]
    rows[10]["content"] = None
    write_hub_repo(tmp_path / "hub", "bigcode/tiny-stack", {"python": {"train": rows, "test": rows[:5]}})
    monkeypatch.setattr(corpus_mod, "hub_location", lambda dataset_id: str(tmp_path / "hub" / dataset_id))
    src = CorpusSource(hf="bigcode/tiny-stack", subset="python", split="train", text_field="content",
                       id_field="hexsha", limit=100)
    out = tmp_path / "corpus"
    summary = write_corpus(out, [src], max_chars=0, shard_docs=64)
    recs = _written(out)
    assert len(recs) == 100 and summary["bad_records"] == 1
    assert [r["id"] for r in recs] == [f"h{i}" for i in range(101) if i != 10]
    assert summary["bad_examples"] == ["hf:bigcode/tiny-stack:train:10: missing or non-string field 'content' "
                                       "(fields: hexsha, content, lang)"]
    assert [p.name for p in sorted(out.glob("*.jsonl"))] == ["tiny-stack-00000.jsonl", "tiny-stack-00001.jsonl"]
    # a local dataset folder can be named directly too
    src2 = CorpusSource(hf=str(tmp_path / "hub" / "bigcode" / "tiny-stack"), subset="python", split="test",
                        text_field="content")
    assert write_corpus(tmp_path / "c2", [src2], max_chars=0, shard_docs=64)["documents"] == 5


def test_a_hub_dataset_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch, datasets_cache):  # noqa: F811
    monkeypatch.setattr(corpus_mod, "hub_location", lambda dataset_id: str(tmp_path / "nowhere" / dataset_id))
    with pytest.raises(PhiforgeError, match=r"corpus source hf:org/missing .*cannot open it") as e:
        write_corpus(tmp_path / "c", [CorpusSource(hf="org/missing")], max_chars=0, shard_docs=10)
    assert "\n" not in str(e.value)


def test_a_stopped_stage_resumes_after_its_last_finished_shard(parquet, tmp_path, monkeypatch, capsys):
    src = CorpusSource(path=str(parquet), text_field="content", id_field="doc_id", label="code")
    ref = tmp_path / "ref"
    write_corpus(ref, [src], max_chars=0, shard_docs=700)
    real = corpus_mod._iter_files

    def breaks_off(s, max_chars):  # a stream that dies after 1,500 records (a dropped connection, a kill)
        for i, item in enumerate(real(s, max_chars)):
            if i == 1500:
                raise PhiforgeError("connection reset")
            yield item

    out = tmp_path / "corpus"
    monkeypatch.setattr(corpus_mod, "_iter_files", breaks_off)
    with pytest.raises(PhiforgeError, match="connection reset"):
        write_corpus(out, [src], max_chars=0, shard_docs=700)
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["code-00000.jsonl", "code-00001.jsonl"]  # no partial
    monkeypatch.setattr(corpus_mod, "_iter_files", real)
    capsys.readouterr()
    summary = write_corpus(out, [src], max_chars=0, shard_docs=700)
    assert "resuming after 2 finished shard(s)" in capsys.readouterr().err
    def shards(d):
        return {p.name: p.read_bytes() for p in d.glob("*.jsonl")}

    assert shards(out) == shards(ref)
    assert summary["documents"] == json.loads((ref / ".progress" / "code.json").read_text())["documents"]
    assert summary["bad_records"] == len([i for i in range(2500) if i % 97 == 5])  # counted once, not twice


def test_source_config_errors_name_the_line(tmp_path):
    from phiforge.run import load_run_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text("corpus:\n  sources:\n    - path: a.jsonl\n      hf: org/name\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:3: corpus\.sources\.0: a corpus source names exactly one"):
        load_run_config(cfg)
    cfg.write_text("corpus:\n  sources:\n    - path: a.jsonl\n      text_feild: body\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4: .*unknown key.*text_feild"):
        load_run_config(cfg)


def test_the_run_corpus_stage_feeds_curation(parquet, tmp_path):
    """`phiforge run`'s corpus and curate stages on a Parquet source: the shards are curation's input, and an
    unchanged corpus section is reused."""
    from phiforge.run import Runner, load_run_config, plan

    over = {"out": str(tmp_path / "run"),
            "corpus": {"sources": [{"path": str(parquet), "text_field": "content", "id_field": "doc_id",
                                    "limit": 300}], "shard_docs": 128},
            "curate": {"steps": [{"type": "python"}, {"type": "exact_dedup"}]}}
    cfg = load_run_config(overrides=over)
    stages = [s for s in plan(cfg) if s.name in ("corpus", "curated")]
    summaries = Runner(Path(cfg.out), log=lambda m: None).run(stages)
    assert summaries["corpus"]["documents"] == 300 and summaries["corpus"]["shards"] == 3
    assert summaries["curated"]["documents_in"] == 300
    curated = sorted((tmp_path / "run" / "curated").glob("*.jsonl"))
    assert [p.name for p in curated] == ["code-00000.jsonl", "code-00001.jsonl", "code-00002.jsonl"]
    logs: list[str] = []
    Runner(Path(cfg.out), log=logs.append).run(stages)
    assert all("up to date" in m for m in logs)
