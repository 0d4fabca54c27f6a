"""Tokenize-and-pack: formats, EOS placement, deterministic split, manifest, bad lines, strict mode, errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from phiforge.data.pack import open_split, pack_corpus, read_manifest
from phiforge.errors import DataError

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "def", "foo", "return", "x", "print", "hello", "world", "python", "code", "textbook", "learn", "graph", "node", "edge", "sum", "loop", "list", "value"]


def _doc(rng: random.Random, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    docs = [_doc(rng) for _ in range(200)]
    a = write_jsonl(tmp_path / "a.jsonl", docs[:150])
    with open(a, "ab") as f:
        f.write(b"{not json\n")  # line 151: invalid JSON
        f.write(b'{"other": "x"}\n')  # line 152: missing field
        f.write(b'{"text": "caf\xe9"}\n')  # line 153: latin-1 byte, not UTF-8
        f.write(json.dumps({"text": docs[150]}).encode() + b"\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs[151:190] + [None]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("\n".join(docs[190:]) + "\n")
    return tmp_path, docs


def test_pack_formats_manifest_and_bad_lines(corpus, tmp_path):
    src, docs = corpus
    res = pack_corpus([str(src / "*.jsonl"), src / "b.parquet", src / "c.txt"], tmp_path / "tok", train_vocab=400,
                      val_fraction=0.1, workers=1)
    m = read_manifest(tmp_path / "tok")
    assert m == res.manifest
    assert m["dtype"] == "uint16" and m["vocab_size"] <= 400
    # 151 good JSONL docs + 39 Parquet rows + 1 text file; the null Parquet row and 3 JSONL lines are bad.
    assert m["documents"] == 151 + 39 + 1
    assert m["bad_lines"]["count"] == 4
    bad = "\n".join(m["bad_lines"]["examples"])
    assert "a.jsonl:151: invalid JSON" in bad
    assert "a.jsonl:152: field 'text' missing" in bad
    assert "a.jsonl:153: undecodable bytes" in bad
    assert "b.parquet:40: column 'text' is null" in bad
    assert [s["documents"] for s in m["sources"]] == [151, 39, 1]
    assert all(len(s["sha256"]) == 64 for s in m["sources"])
    assert m["tokenizer"]["sha256"] == _load_tok(tmp_path / "tok" / "tokenizer").hash()
    # Counts add up, both splits are non-empty, and the shards hold exactly the manifest's tokens.
    tr, va = m["splits"]["train"], m["splits"]["val"]
    assert tr["documents"] + va["documents"] == m["documents"] and va["documents"] > 0
    assert sum(len(a) for a in open_split(tmp_path / "tok", "train")) == tr["tokens"]
    assert tr["tokens"] + va["tokens"] == sum(s["tokens"] for s in m["sources"])


def _load_tok(path):
    from phiforge.tokenizer import load_tokenizer

    return load_tokenizer(path)


def test_documents_are_separated_by_eos_and_roundtrip(tmp_path):
    rng = random.Random(1)
    docs = [_doc(rng, 10) for _ in range(30)]
    write_jsonl(tmp_path / "d.jsonl", docs)
    pack_corpus([tmp_path / "d.jsonl"], tmp_path / "tok", train_vocab=300, val_fraction=0.0, workers=1)
    tok = _load_tok(tmp_path / "tok" / "tokenizer")
    ids = np.concatenate(open_split(tmp_path / "tok", "train"))
    assert ids[-1] == tok.eos_token_id
    pieces = np.split(ids, np.flatnonzero(ids == tok.eos_token_id) + 1)[:-1]
    assert [tok.decode(p[:-1]) for p in pieces] == docs  # file order, one EOS after every document


def test_split_is_deterministic_across_workers_and_order(tmp_path):
    rng = random.Random(2)
    docs = [_doc(rng, 12) for _ in range(120)]
    write_jsonl(tmp_path / "x.jsonl", docs[:60])
    write_jsonl(tmp_path / "y.jsonl", docs[60:])
    tokdir = tmp_path / "t1"
    pack_corpus([tmp_path / "x.jsonl", tmp_path / "y.jsonl"], tokdir, train_vocab=300, val_fraction=0.2, workers=1)
    m2 = pack_corpus([tmp_path / "y.jsonl", tmp_path / "x.jsonl"], tmp_path / "t2", tokenizer=tokdir / "tokenizer",
                     val_fraction=0.2, workers=2, shard_tokens=200).manifest
    m1 = read_manifest(tokdir)
    # Same documents on the val side whatever the file order or worker count; shards roll over at 200 tokens.
    assert m1["splits"]["val"]["tokens"] == m2["splits"]["val"]["tokens"] > 0
    assert m1["splits"]["val"]["documents"] == m2["splits"]["val"]["documents"]
    assert len(m2["splits"]["train"]["shards"]) > 1
    assert all(s["tokens"] <= 200 for s in m2["splits"]["train"]["shards"])
    v1 = np.sort(np.concatenate(open_split(tokdir, "val")))
    v2 = np.sort(np.concatenate(open_split(tmp_path / "t2", "val")))
    assert np.array_equal(v1, v2)
    assert m1["tokenizer"]["sha256"] == m2["tokenizer"]["sha256"]


def test_strict_makes_the_first_bad_line_fatal(corpus, tmp_path):
    src, _ = corpus
    with pytest.raises(DataError, match=r"a\.jsonl:151: invalid JSON"):
        pack_corpus([src / "a.jsonl"], tmp_path / "tok", train_vocab=300, strict=True, workers=1)
    assert not (tmp_path / "tok").exists()  # nothing half-written


def test_empty_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="matches no input files"):
        pack_corpus([str(tmp_path / "*.jsonl")], tmp_path / "tok", train_vocab=300)
    (tmp_path / "e.jsonl").write_text('{"other": 1}\n')
    with pytest.raises(DataError, match="no usable documents"):
        pack_corpus([tmp_path / "e.jsonl"], tmp_path / "tok", tokenizer=_tiny_tokenizer(tmp_path), workers=1)
    with pytest.raises(DataError, match="exactly one"):
        pack_corpus([tmp_path / "e.jsonl"], tmp_path / "tok")


def _tiny_tokenizer(tmp_path):
    from phiforge.tokenizer import train_tokenizer

    rng = random.Random(3)
    tok = train_tokenizer([_doc(rng) for _ in range(20)], vocab_size=300)
    tok.save(tmp_path / "tk")
    return tmp_path / "tk"


def test_uint32_when_vocab_exceeds_uint16(tmp_path, monkeypatch):
    import phiforge.tokenizer as tkmod

    real = tkmod.PhiTokenizer.__len__
    monkeypatch.setattr(tkmod.PhiTokenizer, "__len__", lambda self: 70000)
    write_jsonl(tmp_path / "d.jsonl", ["hello world", "print foo"])
    m = pack_corpus([tmp_path / "d.jsonl"], tmp_path / "tok", tokenizer=_tiny_tokenizer(tmp_path), workers=1,
                    val_fraction=0.0).manifest
    monkeypatch.setattr(tkmod.PhiTokenizer, "__len__", real)
    assert m["dtype"] == "uint32"
    arr = open_split(tmp_path / "tok", "train")[0]
    assert arr.dtype == np.uint32 and arr.nbytes == 4 * m["splits"]["train"]["tokens"]


def test_cli_tokenize_reports_bad_lines(corpus, tmp_path, capsys):
    from phiforge.cli import main

    src, _ = corpus
    code = main(["--quiet", "tokenize", str(src / "a.jsonl"), "--train-tokenizer", "300", "--out",
                 str(tmp_path / "tok"), "--workers", "1"])
    out = capsys.readouterr()
    assert code == 0
    assert "a.jsonl:152: field 'text' missing" in out.err
    assert "151 documents" in out.out
    assert main(["tokenize", str(tmp_path / "nothing*.jsonl"), "--train-tokenizer", "300", "--out",
                 str(tmp_path / "t2")]) == 2
    assert "matches no input files" in capsys.readouterr().err


def test_example_masks_and_boundaries_same_across_workers_and_shards(tmp_path):
    """Fine-tuning examples (--format chat): masks roll over into shards with the ids; offsets are global."""
    from phiforge.data.pack import open_masks, read_offsets

    rng = random.Random(4)
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": _doc(rng, rng.randint(1, 9))},
            {"role": "assistant", "content": _doc(rng, rng.randint(1, 5))}]}) + "\n" for _ in range(40)))
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    m1 = pack_corpus(files, tmp_path / "t1", train_vocab=300, records="chat", workers=2, shard_tokens=100,
                     val_fraction=0.2).manifest
    pack_corpus(files, tmp_path / "t2", tokenizer=tmp_path / "t1" / "tokenizer", records="chat", workers=1,
                val_fraction=0.2)
    assert len(m1["splits"]["train"]["shards"]) > 1
    for split in ("train", "val"):
        ids = [np.concatenate(open_split(tmp_path / t, split)) for t in ("t1", "t2")]
        masks = [np.concatenate(open_masks(tmp_path / t, split)) for t in ("t1", "t2")]
        offsets = [read_offsets(tmp_path / t, split) for t in ("t1", "t2")]
        assert np.array_equal(*ids) and np.array_equal(*masks) and np.array_equal(*offsets)
        assert len(masks[0]) == len(ids[0]) == offsets[0][-1] and 0 < masks[0].sum() < len(masks[0])
    assert m1["splits"]["train"]["documents"] + m1["splits"]["val"]["documents"] == 80
