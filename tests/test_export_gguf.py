"""GGUF export for llama.cpp's phi2 architecture, read back with the `gguf` package's reader."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import tiny_config

TEXTS = ["the cat sat on the mat. the dog sat on the log.", "hello world, how are you today?"] * 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi
    from phiforge.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    model = Phi(tiny_config(vocab_size=320))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, path, tokenizer=tok)
    return path, model, tok


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_export_roundtrip(ckpt, tmp_path, quant):
    import gguf
    import numpy as np

    from phiforge.serve.gguf_export import export_gguf

    path, model, tok = ckpt
    out = export_gguf(path, tmp_path / "m.gguf", quant=quant)
    r = gguf.GGUFReader(str(out))
    cfg = model.config
    assert _field(r, "general.architecture") == "phi2"
    assert _field(r, "phi2.context_length") == cfg.max_position_embeddings
    assert _field(r, "phi2.embedding_length") == cfg.hidden_size
    assert _field(r, "phi2.feed_forward_length") == cfg.intermediate_size
    assert _field(r, "phi2.block_count") == cfg.num_hidden_layers
    assert _field(r, "phi2.attention.head_count") == cfg.num_attention_heads
    assert _field(r, "phi2.attention.head_count_kv") == cfg.num_key_value_heads
    assert _field(r, "phi2.attention.layer_norm_epsilon") == pytest.approx(cfg.layer_norm_eps)
    assert _field(r, "phi2.rope.dimension_count") == cfg.rotary_dim
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size
    assert tokens[:len(tok)] == [tok.id_to_token(i) for i in range(len(tok))]
    assert tokens[len(tok):] == [f"[PAD{i}]" for i in range(len(tok), cfg.vocab_size)]
    merges = _field(r, "tokenizer.ggml.merges")
    assert len(merges) > 0 and all(len(m.split(" ")) == 2 for m in merges)
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    expect = {"token_embd.weight": sd["model.embed_tokens.weight"], "output.weight": sd["lm_head.weight"],
              "output.bias": sd["lm_head.bias"], "output_norm.weight": sd["model.final_layernorm.weight"],
              "output_norm.bias": sd["model.final_layernorm.bias"]}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            expect[f"blk.{i}.attn_qkv.{kind}"] = np.concatenate(
                [sd[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            expect[f"blk.{i}.attn_norm.{kind}"] = sd[f"{p}input_layernorm.{kind}"]
            expect[f"blk.{i}.attn_output.{kind}"] = sd[f"{p}self_attn.dense.{kind}"]
            expect[f"blk.{i}.ffn_up.{kind}"] = sd[f"{p}mlp.fc1.{kind}"]
            expect[f"blk.{i}.ffn_down.{kind}"] = sd[f"{p}mlp.fc2.{kind}"]
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(expect)
    # Every name is one llama.cpp's phi2 architecture knows.
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.PHI2]}
    assert all(n.rsplit(".", 1)[0].replace(n.split(".")[1], "{bid}") in known if n.startswith("blk.")
               else n.rsplit(".", 1)[0] in known for n in got)
    for name, ref in expect.items():
        t = got[name]
        assert tuple(reversed([int(x) for x in t.shape])) == ref.shape  # GGUF lists dims innermost first
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            assert quant == "q8_0" and ref.ndim == 2
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
            tol = np.abs(ref).max(axis=-1, keepdims=True) / 127  # one quantization step per row (block max <=)
            assert np.all(np.abs(data - ref) <= tol + 1e-6)
        else:
            data = np.asarray(t.data, dtype=np.float32).reshape(ref.shape)
            if ref.ndim == 2:
                assert t.tensor_type == gguf.GGMLQuantizationType.F16 or quant == "q8_0"
                np.testing.assert_allclose(data, ref.astype(np.float16).astype(np.float32), rtol=0, atol=0)
            else:
                assert t.tensor_type == gguf.GGMLQuantizationType.F32
                np.testing.assert_array_equal(data, ref)
    if quant == "q8_0":
        assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in r.tensors)


def test_export_cli_and_errors(ckpt, tmp_path):
    path, _, _ = ckpt
    out = tmp_path / "cli.gguf"
    r = subprocess.run([sys.executable, "-m", "phiforge", "export", "gguf", "--model", str(path), "--out", str(out),
                        "--quant", "q8_0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "q8_0" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "phiforge", "export", "gguf", "--model", str(tmp_path / "missing"),
                          "--out", str(tmp_path / "x.gguf")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "phiforge: error:" in bad.stderr and "Traceback" not in bad.stderr
