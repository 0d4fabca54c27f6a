"""Property tests for every reader of phiforge's inputs (issue 22): arbitrary bytes and truncations of real files
never give a traceback (only a PhiforgeError, or for record streams a named skip), a hang (hypothesis' deadline),
or a partial result that looks complete (a truncated file is an error, or every record it yields is whole and
every line it could not read is reported)."""

from __future__ import annotations

import contextlib
import gzip
import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phiforge.errors import PhiforgeError

PROPERTY = settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=12), lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)


def records(n: int = 12) -> list[dict]:
    rng = random.Random(n)
    return [{"id": i, "text": " ".join(rng.choice(["déjà", "vu", "x", "ÿ", "line\nbreak"]) for _ in range(6))}
            for i in range(n)]


def jsonl_bytes(recs: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")


# ---- JSONL (curate, tokenize, synth, the ledger) ----------------------------------------------------------------
def _lines(data: bytes) -> list[int]:
    """Numbers of the non-blank lines of a file, as iter_jsonl numbers them."""
    return [i for i, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]


@PROPERTY
@given(data=st.binary(max_size=600))
def test_jsonl_any_bytes_every_line_accounted_for(tmp_path, data):
    from phiforge.readers import iter_jsonl

    f = tmp_path / "x.jsonl"
    f.write_bytes(data)
    got = list(iter_jsonl(f))
    assert [n for n, _, _ in got] == _lines(data)  # one result per non-blank line, numbered as in the file
    assert all((obj is None) != (why is None) for _, obj, why in got)


@PROPERTY
@given(cut=st.integers(0, 2000))
def test_jsonl_truncation_never_yields_a_partial_record(tmp_path, cut):
    from phiforge.readers import iter_jsonl

    recs = records()
    data = jsonl_bytes(recs)[:cut]
    f = tmp_path / "x.jsonl"
    f.write_bytes(data)
    got = list(iter_jsonl(f))
    assert [n for n, _, _ in got] == _lines(data)
    for n, obj, _ in got:
        assert obj is None or obj == recs[n - 1]  # whole, or reported: a cut record never parses as a record


@PROPERTY
@given(cut=st.integers(0, 700))
def test_jsonl_gz_truncation_reports_what_it_could_not_read(tmp_path, cut):
    from phiforge.readers import iter_jsonl

    recs = records(40)
    full = gzip.compress(jsonl_bytes(recs))
    f = tmp_path / "x.jsonl.gz"
    f.write_bytes(full[:cut])
    got = list(iter_jsonl(f))
    good = [(n, obj) for n, obj, why in got if why is None]
    assert all(obj == recs[n - 1] for n, obj in good)
    assert len(good) == len(recs) or any(why for _, _, why in got)  # never a silent short read


@PROPERTY
@given(data=st.binary(max_size=400))
def test_curate_shards_any_bytes(tmp_path, data):
    from phiforge.data.curate.shards import BadRecord, Record, read_records

    for name in ("x.jsonl", "x.jsonl.gz"):
        f = tmp_path / name
        f.write_bytes(data)
        got = list(read_records(f))
        assert all(isinstance(r, (Record, BadRecord)) for r in got)


@PROPERTY
@given(data=st.binary(max_size=400), cut=st.integers(0, 2000))
def test_synth_resumable_shards(tmp_path, data, cut):
    from phiforge.data.synth.pipeline import read_jsonl_resumable

    f = tmp_path / "shard-00000.jsonl"
    for content in (data, jsonl_bytes([{"key": f"k{i}", "text": "t"} for i in range(30)])[:cut]):
        f.write_bytes(content)
        try:
            got = read_jsonl_resumable(f, ("key", "text"))
        except PhiforgeError:
            continue
        assert all(isinstance(r, dict) and isinstance(r["key"], str) for r in got)


@PROPERTY
@given(cut=st.integers(0, 3000))
def test_spend_ledger_truncation_never_forgets_spending(tmp_path, cut):
    from phiforge.lm.openai_api import SpendLedger

    path = tmp_path / f"spend-{cut}.jsonl"
    ledger = SpendLedger(path)
    for i in range(20):
        rid = ledger.reserve(0.5)
        ledger.settle(rid, 0.1 * (i % 3), 10, 20, sent=True)
    data = path.read_bytes()[:cut]
    path.write_bytes(data)
    settled = sum(json.loads(x).get("cost", 0.0) for x in data.split(b"\n")[:-1] if b'"cost"' in x)
    assert SpendLedger(path).spent.cost >= settled - 1e-9


# ---- whole JSON documents and YAML --------------------------------------------------------------------------------
@PROPERTY
@given(data=st.binary(max_size=400))
def test_json_documents_any_bytes(tmp_path, data):
    from phiforge.readers import read_json

    f = tmp_path / "x.json"
    f.write_bytes(data)
    try:
        assert isinstance(read_json(f, what="a test document"), dict)
    except PhiforgeError as e:
        assert "\n" not in str(e) and str(f) in str(e)


@PROPERTY
@given(data=st.binary(max_size=400))
def test_yaml_any_bytes(tmp_path, data):
    from phiforge.configio import load_yaml

    f = tmp_path / "x.yaml"
    f.write_bytes(data)
    try:
        assert isinstance(load_yaml(f).data, dict)
    except PhiforgeError as e:
        assert str(f) in str(e) and "\n" not in str(e)


@PROPERTY
@given(fields=st.dictionaries(st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "layer_norm_eps", "partial_rotary_factor",
                                               "rope_theta", "tie_word_embeddings", "hidden_act", "eos_token_id",
                                               "head_dim", "rope_parameters", "rope_scaling", "resid_pdrop",
                                               "vocab_size", "intermediate_size", "qk_layernorm"]),
                              json_values, max_size=4))
def test_config_json_any_field_values(fields):
    from phiforge.config import ModelConfig

    base = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4).to_hf()
    try:
        cfg = ModelConfig.from_hf({**base, **fields}, source="config.json")
    except PhiforgeError as e:
        assert str(e).startswith("config.json: ")
        return
    assert cfg.hidden_size % cfg.num_attention_heads == 0 and cfg.layer_norm_eps > 0


# ---- checkpoints (config.json + safetensors) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch
    from conftest import tiny_config

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "c"
    save_checkpoint(Phi(tiny_config(num_hidden_layers=1, hidden_size=32, intermediate_size=64)), path)
    return path


def _damaged_copy(src: Path, dst: Path, name: str, content: bytes) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    (dst / name).write_bytes(content)
    return dst


@settings(max_examples=40, deadline=10000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**6), flip=st.integers(0, 10**6), byte=st.integers(0, 255))
def test_safetensors_truncated_or_flipped(checkpoint, tmp_path, cut, flip, byte):
    import torch

    from phiforge.checkpoint import SAFE_NAME, load_checkpoint

    full = (checkpoint / SAFE_NAME).read_bytes()
    cut %= len(full)
    with pytest.raises(PhiforgeError):  # any truncation: an error, never a model
        load_checkpoint(_damaged_copy(checkpoint, tmp_path / "t", SAFE_NAME, full[:cut]))
    flipped = bytearray(full)
    flipped[flip % len(full)] = byte
    try:  # a changed byte: an error, or a model (safetensors has no checksum; NaN/inf values are refused)
        model = load_checkpoint(_damaged_copy(checkpoint, tmp_path / "f", SAFE_NAME, bytes(flipped)))
    except PhiforgeError:
        return
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@PROPERTY
@given(data=st.binary(max_size=300))
def test_checkpoint_config_json_any_bytes(checkpoint, tmp_path, data):
    from phiforge.checkpoint import load_checkpoint

    with pytest.raises(PhiforgeError):
        load_checkpoint(_damaged_copy(checkpoint, tmp_path / "c", "config.json", data))


# ---- token shards and their manifest ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    from phiforge.data.pack import pack_corpus

    tmp = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    (tmp / "c.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice("abcdefgh") for _ in range(30))})
                                         + "\n" for _ in range(60)))
    pack_corpus([tmp / "c.jsonl"], tmp / "tok", train_vocab=300, val_fraction=0.2, workers=1)
    return tmp / "tok"


def _load_all(tok: Path) -> int:
    """Everything training reads of a token directory: the manifest, every shard, a batch of each split."""
    from phiforge.train.data import open_loader

    n = 0
    for split in ("train", "val"):
        loader = open_loader(tok, split, 8, 2, shuffle=False)
        if loader.n_chunks:
            n += int(loader.next_batch()[0].numel())
    return n


@PROPERTY
@given(cut=st.integers(0, 10**5))
def test_token_shard_truncation_is_an_error(tokens, tmp_path, cut):
    from phiforge.data.pack import read_manifest

    name = read_manifest(tokens)["splits"]["train"]["shards"][0]["file"]
    full = (tokens / name).read_bytes()
    with pytest.raises(PhiforgeError, match="re-run `phiforge tokenize`"):
        _load_all(_damaged_copy(tokens, tmp_path / "t", name, full[: cut % len(full)]))


@PROPERTY
@given(cut=st.integers(0, 10**5), data=st.binary(max_size=300))
def test_manifest_truncated_or_any_bytes(tokens, tmp_path, cut, data):
    full = (tokens / "manifest.json").read_bytes()
    for content in (full[: cut % len(full)], data):
        if content.strip() == full.strip():
            continue
        with pytest.raises(PhiforgeError):
            _load_all(_damaged_copy(tokens, tmp_path / "m", "manifest.json", content))


@PROPERTY
@given(path=st.lists(st.sampled_from(["splits", "train", "val", "shards", 0, "file", "tokens", "dtype",
                                      "vocab_size", "eos_token_id", "documents", "tokenizer", "sha256"]),
                     min_size=1, max_size=4), value=json_values)
def test_manifest_any_field_value(tokens, tmp_path, path, value):
    m = json.loads((tokens / "manifest.json").read_text())
    node = m
    for key in path[:-1]:  # follow the path as far as it exists, then set the value there
        nxt = node[key] if isinstance(node, dict) and key in node or isinstance(node, list) and \
            isinstance(key, int) and key < len(node) else None
        if not isinstance(nxt, (dict, list)):
            break
        node = nxt
    if isinstance(node, dict) and not isinstance(path[-1], int):
        node[path[-1]] = value
    elif isinstance(node, list) and node:
        node[0] = value
    copy = _damaged_copy(tokens, tmp_path / "v", "manifest.json", json.dumps(m).encode())
    with contextlib.suppress(PhiforgeError):  # an error or a load: never anything else
        _load_all(copy)
