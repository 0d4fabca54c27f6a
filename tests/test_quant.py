"""Weight-only int8 / int4 quantization: the math, the kernels against dequantize-then-matmul, and end-to-end
decoding quality against full precision."""

from __future__ import annotations

import pytest
from conftest import tiny_config


def _model(seed=0, **kw):
    import torch

    from phiforge.model import Phi

    torch.manual_seed(seed)
    model = Phi(tiny_config(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def test_int8_and_int4_math():
    import torch

    from phiforge.serve.quant import quantize_int4, quantize_int8

    torch.manual_seed(0)
    w = torch.randn(48, 128)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6  # within half a step
    q4, s4, z4 = quantize_int4(w, 32)
    assert q4.min() >= 0 and q4.max() <= 15 and s4.shape == (48, 4)
    deq = (q4.view(48, 4, 32).float() - 8) * s4[..., None] + z4[..., None]
    assert (deq.view(48, 128) - w).abs().max() <= s4.max() / 2 + 1e-5


@pytest.mark.parametrize("mode,group", [("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_quantlinear_matches_dequantized_weight(mode, group):
    import torch
    import torch.nn.functional as F

    from phiforge.serve.quant import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    ql = QuantLinear(lin, mode, group_size=group)
    assert ql.kernel in ("q8", "int8pack_mm", "int4pack_mm", "q4", "dequant")
    w = ql.dequantize()
    if ql.kernel == "q4":  # the native kernel's format (groups of 32, scale = signed extreme / -8): its own codes
        from phiforge import kernels

        assert ql.group_size == 32
        torch.testing.assert_close(w, kernels.dequantize_q4(kernels.quantize_q4(lin.weight)), rtol=0, atol=0)
        # within half a step, or one step where +8 steps clamp to +7: at most |row max| / 8 (fp16 scale rounding)
        step = lin.weight.abs().amax(1, keepdim=True) / 4
    else:
        step = (lin.weight.abs().amax(1, keepdim=True) / 127) if mode == "int8" else (
            lin.weight.view(96, -1, ql.group_size).amax(-1) - lin.weight.view(96, -1, ql.group_size).amin(-1)
        ).max() / 15
    assert (w - lin.weight).abs().le(step / 2 + 1e-3).all()
    for rows in (7, 20):  # decoding-sized batches and prefill-sized ones take different kernels
        x = torch.randn(2, rows, 256)
        ref = F.linear(x, w, lin.bias)
        out = ql(x)
        assert out.shape == (2, rows, 96) and out.dtype == x.dtype
        # torch's kernels take bf16 activations: agreement to bf16 precision.
        assert torch.allclose(out, ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_portable_path_matches_kernel(mode):
    import torch
    import torch.nn.functional as F

    from phiforge.serve.quant import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    fast, slow = QuantLinear(lin, mode, 32), QuantLinear(lin, mode, 32, use_kernel=False)
    assert slow.kernel == "dequant"
    x = torch.randn(3, 64)
    w = slow.dequantize()
    assert torch.allclose(slow(x), F.linear(x, w, lin.bias), atol=1e-5)  # fp32 throughout: exact
    if fast.kernel == "q4":  # the native int4 kernel has its own format (symmetric groups of 32): its own weight
        w = fast.dequantize()
        assert (w - lin.weight).abs().max() <= lin.weight.abs().max() / 8  # at most one step of 1/8 the extreme
        assert torch.allclose(fast(x), F.linear(x, w, lin.bias), atol=3e-2)
        return
    assert torch.allclose(fast.dequantize(), w, atol=1e-3)  # same codes (kernel path keeps bf16 scales)
    assert torch.allclose(fast(x), slow(x), atol=3e-2)


def test_quantize_swaps_linears_and_decodes():
    import torch

    from phiforge.generate import GenerationConfig, generate_ids
    from phiforge.serve.quant import (
        QuantLinear,
        is_quantized,
        quality_report,
        quantize,
        weight_bytes_per_token,
    )

    ref = _model()
    ids = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(1))
    fp_bytes = weight_bytes_per_token(ref)
    for mode, ratio in (("int8", 0.35), ("int4", 0.25)):
        q = _model()
        quantize(q, mode, group_size=64)
        assert is_quantized(q) and isinstance(q.lm_head, QuantLinear)
        assert isinstance(q.model.layers[0].self_attn.q_proj, QuantLinear)
        assert isinstance(q.model.layers[1].mlp.fc2, QuantLinear)
        assert weight_bytes_per_token(q) < ratio * fp_bytes
        rep = quality_report(ref, q, ids)
        assert rep["tokens"] == 119
        assert rep["greedy_agreement"] >= (0.9 if mode == "int8" else 0.6)
        assert abs(rep["ppl_delta_pct"]) < (1.0 if mode == "int8" else 5.0)
        # Works through the plain generation API too (a padded batch: the modules' path, fp16 KV cache).
        out = generate_ids(q, [[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=6), pack=False)
        assert [len(o) for o in out] == [6, 6]
        assert q.new_cache(1, 8).k[0].dtype == torch.float16  # quantized on the CPU: llama.cpp's f16 cache


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_embedding_rows(mode):
    """QuantEmbedding (int8 in both modes): every row within half a step of the float row (its own scale), a
    lookup equals the same rows of the whole dequantized table (prefill and decode see the same numbers), the table
    is 4x smaller than fp32, and quantize() swaps it in (or keeps the float one when asked)."""
    import torch

    from phiforge.serve.quant import QuantEmbedding, quantize, weight_bytes_per_token

    torch.manual_seed(0)
    emb = torch.nn.Embedding(300, 96)
    q = QuantEmbedding(emb)
    table = q.dequantize()
    assert table.shape == (300, 96) and table.dtype == torch.float32
    w = emb.weight.detach()
    assert ((table - w).abs() <= w.abs().amax(1, keepdim=True) / 254 * (1 + 1e-5)).all()
    assert (table - w).abs().max() > 0  # it is quantized
    ids = torch.tensor([[5, 0, 299], [7, 7, 42]])
    assert torch.equal(q(ids), table[ids])
    assert q.nbytes() <= w.numel() * 4 / 3.5
    assert q.weight.dtype == torch.float32 and q.weight.numel() == 0  # device/dtype questions still answered

    model = quantize(_model(), mode)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    kept = quantize(_model(), mode, include_embedding=False)
    assert type(kept.model.embed_tokens) is torch.nn.Embedding
    row = model.model.embed_tokens.nbytes() // model.config.vocab_size
    assert weight_bytes_per_token(kept) - weight_bytes_per_token(model) == model.config.hidden_size * 4 - row


def test_quantized_engine_agrees_with_full_precision_greedy():
    import torch

    from phiforge.lm.sampling import Sampling
    from phiforge.serve.engine import Engine, Request
    from phiforge.serve.quant import quantize

    class Tok:  # ids in, ids out: the engine only needs decode for text
        eos_token_id = pad_token_id = 0

        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)

    ref = Engine(_model(), Tok())
    q = Engine(quantize(_model(), "int8"), Tok())
    torch.manual_seed(2)
    prompts = [torch.randint(1, 256, (n,)).tolist() for n in (5, 9, 13)]
    a = ref.run([Request(p, Sampling(max_new_tokens=8), ignore_eos=True) for p in prompts])
    b = q.run([Request(p, Sampling(max_new_tokens=8), ignore_eos=True) for p in prompts])
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra.token_ids, rb.token_ids))
    assert same >= 0.75 * 24


def test_chunked_prefill_equals_single_pass():
    from phiforge.lm.sampling import Sampling
    from phiforge.serve.engine import Engine, Request

    class Tok:
        eos_token_id = pad_token_id = 0

        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)

    model = _model()
    prompts = [list(range(1, 40)), list(range(7, 20))]
    whole = Engine(model, Tok(), prefill_chunk=512).run([Request(p, Sampling(max_new_tokens=6), ignore_eos=True, logprobs=0)
                                                          for p in prompts])
    chunked = Engine(model, Tok(), prefill_chunk=8).run([Request(p, Sampling(max_new_tokens=6), ignore_eos=True, logprobs=0)
                                                          for p in prompts])
    for w, c in zip(whole, chunked):
        assert w.token_ids == c.token_ids
        assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(w.logprobs, c.logprobs))


def test_unknown_mode():
    from phiforge.serve.quant import quantize

    with pytest.raises(ValueError, match="int2"):
        quantize(_model(), "int2")
