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


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
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
        if t.tensor_type in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
            assert t.tensor_type.name.lower() == quant and ref.ndim == 2
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
            # one quantization step per row (a block's max <= the row's): max / 127, or max / 8 for q4_0
            tol = np.abs(ref).max(axis=-1, keepdims=True) / (127 if quant == "q8_0" else 8)
            assert np.all(np.abs(data - ref) <= tol * 1.001 + 1e-6)
        else:
            data = np.asarray(t.data, dtype=np.float32).reshape(ref.shape)
            if ref.ndim == 2:
                assert t.tensor_type == gguf.GGMLQuantizationType.F16 or quant != "f16"
                np.testing.assert_allclose(data, ref.astype(np.float16).astype(np.float32), rtol=0, atol=0)
            else:
                assert t.tensor_type == gguf.GGMLQuantizationType.F32
                np.testing.assert_array_equal(data, ref)
    if quant != "f16":
        assert any(t.tensor_type.name.lower() == quant for t in r.tensors)
        assert _field(r, "general.file_type") == {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                                                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]


def test_q4_0_is_ggmls_and_reads_back(ckpt, tmp_path):
    """q4_0 blocks byte for byte as the gguf package's reference quantizer writes them (ggml's definition: f16
    d = signed extreme / -8, codes trunc(w / d + 8.5) clamped to 15, low nibbles the first 16), read back with
    the gguf reader and dequantized by it and by us alike, within the format's error bound of the weights."""
    import gguf
    import numpy as np

    from phiforge.serve.gguf_export import dequantize_q4_0, export_gguf, quantize_q4_0

    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 96)).astype(np.float32)
    w[0, :32] = 0  # an all-zero block: d = 0, codes 8
    w[1, 32:64] = np.linspace(-1, 1, 32, dtype=np.float32)  # ties of magnitude: the first (-1) is the extreme
    w[2, 64:] = np.abs(w[2, 64:])  # a positive extreme: d < 0
    ours = quantize_q4_0(w)
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    assert ours.dtype == np.uint8 and ours.shape == (7, 96 // 32 * 18) and np.array_equal(ours, ref)
    deq = dequantize_q4_0(ours)
    assert np.array_equal(deq, gguf.quants.dequantize(ref, gguf.GGMLQuantizationType.Q4_0))
    blocks, dblocks = w.reshape(-1, 32), deq.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 8  # |d|
    err = np.abs(blocks - dblocks)
    # half a step (and f16's rounding of d, at most 8 steps' worth of 2^-11), a whole one where w / d rounds to +8
    ext = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)  # signed extreme
    clamped = -8 * blocks * np.sign(ext) > 7.5 * np.abs(ext)  # w / d > 7.5
    assert np.all(err <= np.where(clamped, step, step / 2) * (1 + 2 ** -10 * 16) + 1e-7)
    assert np.all(dblocks[0] == 0) and dblocks[4, 0] == -1  # (row 1, block 1): the extreme is exact where d is

    path, model, _ = ckpt
    out = export_gguf(path, tmp_path / "q4.gguf", quant="q4_0")
    r = gguf.GGUFReader(str(out))
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_up.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
    fc1 = model.model.layers[0].mlp.fc1.weight.detach().float().numpy()
    assert np.array_equal(np.asarray(t.data), quantize_q4_0(fc1))
    back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(fc1.shape)
    assert np.array_equal(back, dequantize_q4_0(np.asarray(t.data)))
    assert np.all(np.abs(back - fc1) <= np.abs(fc1).max() / 8 * 1.01)


def test_export_cli_and_errors(ckpt, tmp_path):
    path, _, _ = ckpt
    out = tmp_path / "cli.gguf"
    r = subprocess.run([sys.executable, "-m", "phiforge", "export", "gguf", "--model", str(path), "--out", str(out),
                        "--quant", "q8_0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "q8_0" in r.stdout
    r = subprocess.run([sys.executable, "-m", "phiforge", "export", "gguf", "--model", str(path), "--out", str(out),
                        "--quant", "q4_0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "q4_0" in r.stdout, r.stderr
    bad = subprocess.run([sys.executable, "-m", "phiforge", "export", "gguf", "--model", str(path), "--out",
                          str(out), "--quant", "q3_0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "q4_0" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "phiforge", "export", "gguf", "--model", str(tmp_path / "missing"),
                          "--out", str(tmp_path / "x.gguf")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "phiforge: error:" in bad.stderr and "Traceback" not in bad.stderr
