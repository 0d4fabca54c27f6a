"""The decode plan (phiforge.decode): one-token steps equal the model's modules, greedy steps their argmax, and a
plan is never used once the weights it copied have changed."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from phiforge.decode import ArgmaxScreen, Decoder, default_kernel, mkldnn_bf16, plan_of, release
from phiforge.generate import GenerationConfig, generate_ids
from phiforge.model import Phi
from tests.test_generate import VOCAB, hf_greedy, spread_model

NO_ONEDNN_BF16 = "this CPU lacks oneDNN's bf16 path (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)"


@pytest.fixture(scope="module")
def model_and_hf(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from phiforge.checkpoint import save_checkpoint

    model = spread_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, hf


def decode_logits(model: Phi, ids: torch.Tensor, decoder: Decoder | None = None) -> torch.Tensor:
    """Logits of the last token of `ids` (1, T), decoded one step after a prefill of the rest (through `decoder`,
    whose plan runs the step where it serves; without one, the model's modules)."""
    decoder = decoder or Decoder(model)
    cache = model.new_cache(1, 16)
    with torch.inference_mode():
        decoder.step(ids[:, :-1], cache)
        return decoder.step(ids[:, -1:], cache)[0, -1]


IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2}, {"qk_layernorm": True}])
@pytest.mark.parametrize("kernel", ["t", "plain"])
def test_plan_decode_matches_modules_in_fp32(overrides, kernel):
    model = spread_model(**overrides)
    plain = decode_logits(model, IDS)
    decoder = Decoder.build(model, kernel)
    assert decoder.plan is not None
    planned = decode_logits(model, IDS, decoder)
    assert decoder.plan is not None  # the step ran on the plan (it was fresh)
    torch.testing.assert_close(planned, plain, rtol=1e-5, atol=1e-5)


def test_onednn_bf16_is_used_only_where_the_cpu_runs_it():
    """The probe says whether a prepacked bf16 linear runs here (AVX2-only CPUs: the reorder raises)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 8, generator=g).bfloat16(), torch.randn(2, 8, generator=g).bfloat16()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError:
        y = None
    assert mkldnn_bf16() == (y is not None)
    if y is not None:
        torch.testing.assert_close(y.float(), torch.nn.functional.linear(x, w).float(), rtol=0.02, atol=0.02)
    assert default_kernel(w) == ("mkldnn" if mkldnn_bf16() else "plain")
    assert default_kernel(w.float()) == "t"


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2}])
@pytest.mark.parametrize("kernel", [None, pytest.param("mkldnn", marks=pytest.mark.skipif(
    not mkldnn_bf16(), reason=NO_ONEDNN_BF16))])
def test_plan_decode_bf16_is_close_and_tracks_weight_changes(overrides, kernel):
    model = spread_model(**overrides).to(torch.bfloat16)
    plain = decode_logits(model, IDS)
    decoder = Decoder.build(model, kernel)  # None: the default for bf16 on this CPU
    assert decoder.plan.kernel in ("mkldnn", "plain")
    planned = decode_logits(model, IDS, decoder)
    torch.testing.assert_close(planned.float(), plain.float(), rtol=0.05, atol=0.15)  # other bf16 kernels
    # weights changed in place after planning: the stale copies must not be used
    with torch.no_grad():
        model.model.layers[1].mlp.fc2.weight.mul_(2.0)
    changed = decode_logits(model, IDS, decoder)
    assert decoder.plan is None  # dropped as stale
    torch.testing.assert_close(changed, decode_logits(model, IDS), rtol=0, atol=0)
    assert (changed.float() - plain.float()).abs().max() > 1.0
    # dtype conversion (module.to swaps .data) invalidates the plan too
    decoder = Decoder.build(model, kernel)
    model.to(torch.float32)
    assert decode_logits(model, IDS, decoder).dtype == torch.float32 and decoder.plan is None


def test_plan_calls_swapped_in_linear_modules():
    """A linear replaced from outside by another module type (as serve/quant does) is called, not copied."""

    class Doubled(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return 2 * self.linear(x)

    model = spread_model()
    decoder = Decoder.build(model)
    attn = model.model.layers[0].self_attn
    attn.k_proj = Doubled(attn.k_proj)
    model.lm_head = Doubled(model.lm_head)
    plain = model(IDS)[0, -1].detach()
    assert decoder.plan is not None and not decoder.plan.fresh()  # the swap made the plan stale
    decoder = Decoder.build(model)
    torch.testing.assert_close(decode_logits(model, IDS, decoder), plain, rtol=1e-5, atol=1e-5)
    assert decoder.plan is not None and decoder.plan.fresh()


def greedy_vs_argmax(decoder: Decoder, steps: int) -> list[list[int]]:
    """Feed the same random tokens to two caches; greedy_step's tokens must equal the full logits' argmax."""
    model = decoder.model
    a, b = model.new_cache(2, 32), model.new_cache(2, 32)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    g = torch.Generator().manual_seed(0)
    picked = []
    with torch.inference_mode():
        decoder.step(prompt, a), decoder.step(prompt, b)
        for _ in range(steps):
            tok = torch.randint(0, VOCAB, (2, 1), generator=g)
            fast = decoder.greedy_step(tok, a)
            assert fast.tolist() == decoder.step(tok, b)[:, -1].argmax(-1).tolist()
            picked.append(fast.tolist())
    return picked


@pytest.mark.parametrize("kernel", ["t", "plain"])
def test_greedy_step_is_the_argmax_of_the_logits(kernel):
    model = spread_model()
    decoder = Decoder.build(model, kernel)
    greedy_vs_argmax(decoder, 8)
    assert decoder.plan is not None and decoder.plan.fresh()
    with torch.no_grad():  # an exact tie at the top: the lowest id wins, as with a full argmax
        model.lm_head.weight[250] = model.lm_head.weight[40]
        model.lm_head.bias[250] = model.lm_head.bias[40] = 40.0
    decoder = Decoder.build(model, kernel)
    assert greedy_vs_argmax(decoder, 3) == [[40, 40]] * 3
    assert decoder.plan is not None and decoder.plan.fresh()


def test_greedy_step_of_a_bf16_model_is_the_argmax_of_its_logits():
    model = spread_model().to(torch.bfloat16)
    decoder = Decoder.build(model)
    greedy_vs_argmax(decoder, 8)
    assert decoder.plan is not None and decoder.plan.fresh()


@pytest.mark.parametrize("kind,dtype", [("int8", torch.float32), ("int8", torch.bfloat16),
                                        ("bf16", torch.float32)])
def test_argmax_screen_is_exact_even_for_near_ties(kind, dtype):
    from phiforge import kernels

    if kind == "int8" and not kernels.available():
        pytest.skip("no C compiler for the native int8 kernel")
    if kind == "bf16" and not mkldnn_bf16():
        pytest.skip(NO_ONEDNN_BF16)
    g = torch.Generator().manual_seed(0)
    V, d = 4096, 96
    w = torch.randn(V, d, generator=g) / d ** 0.5
    b = torch.randn(V, generator=g) * 0.1
    # near-ties far below the screen's quantization error: rows 7..15 are row 3 nudged by 1e-4 relative
    for i in range(7, 16):
        w[i] = w[3] * (1 + 1e-4 * (i - 11))
        b[i] = b[3]
    w, b = w.to(dtype), b.to(dtype)
    screen = ArgmaxScreen(kind, w, b)
    full = torch.nn.functional.linear
    decided = 0
    for trial in range(60):
        h = torch.randn(3, d, generator=g) * 3
        if trial % 2:
            h[0] = w[3].float() * 40  # make the near-tied rows the top
        h = h.to(dtype)
        tok = screen.argmax(h)
        if tok is not None:
            decided += 1
            assert tok.tolist() == full(h, w, b).float().argmax(-1).tolist()
    assert decided >= 50  # the screen decides nearly always; when it declines the caller computes in full
    flat = ArgmaxScreen(kind, torch.zeros(V, d, dtype=dtype), torch.zeros(V, dtype=dtype))
    assert flat.argmax(torch.ones(1, d, dtype=dtype)) is None  # every row is a candidate: not worth screening


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_plan_runs_quantized_layers_fused_and_exactly(mode):
    from phiforge import kernels
    from phiforge.serve.quant import quantize

    if not kernels.available():
        pytest.skip("no C compiler for the native kernels")
    model = quantize(spread_model(), mode)
    plain = decode_logits(model, IDS)
    decoder = Decoder.build(model)
    assert decoder.plan.layers[0][5] is None  # fc1 fused with q, k, v into one quantized matmul
    assert decoder.plan.screen is None  # the lm_head is quantized already: its argmax is read directly
    assert decoder.plan.native.n == len(model.model.layers)  # every layer native, all in one call (NativeStack)
    assert f"native {mode} stack" in decoder.plan.describe()
    # LayerNorm, GELU and softmax agree with torch's to a few ulp, but the rounding of each activation row to
    # integers is discontinuous: an ulp can move one code by 1 (int8 weights, int16 codes: ~1e-4 on these logits;
    # int4 weights, int8 codes per block of 64: ~1e-3). Quantization itself costs ~0.1.
    atol = 2e-3 if mode == "int8" else 1e-2
    native = decode_logits(model, IDS, decoder)
    torch.testing.assert_close(native, plain, rtol=0, atol=atol)
    decoder.plan.native = None  # the plan's torch path: the same kernels, attention by hand (not SDPA):
    torch.testing.assert_close(decode_logits(model, IDS, decoder), plain, rtol=0, atol=atol)  # the same caveat
    greedy_vs_argmax(decoder, 6)
    with torch.no_grad():  # codes changed in place: the fused copies are stale and must not be used
        model.model.layers[0].mlp.fc1.qweight.neg_()
    changed = decode_logits(model, IDS, decoder)
    assert decoder.plan is None and not torch.equal(changed, plain)


@pytest.mark.parametrize("mode,overrides", [("int8", {}), ("int4", {}), ("int8", {"num_key_value_heads": 2})])
def test_plan_prefill_of_native_layers_is_the_modules_forward(mode, overrides):
    """A prompt's last-position logits (generation's prefill) run on the plan where every layer is native: q, k, v
    and fc1 in one matmul, GELU native, the rest the modules' own arithmetic. So the first layer's keys and values
    in the cache are bit-equal to the modules' forward's, the cache's length and counts equal, and the logits agree
    to what GELU's few ulp do (through the integer rounding of later activations: the caveat above); the same for
    a prompt after cached positions (chunked prefill), grouped kv heads, and two rows at once (attention in torch
    then). All positions (last_only=False) still run the modules."""
    from phiforge import kernels
    from phiforge.serve.quant import quantize

    if not kernels.available():
        pytest.skip("no C compiler for the native kernels")
    model = quantize(spread_model(**overrides), mode)
    decoder = Decoder.build(model)
    ran = []
    prefill = decoder.plan.prefill
    decoder.plan.prefill = lambda *a: ran.append(1) or prefill(*a)
    assert "prefill: q, k, v and fc1 in one matmul" in decoder.describe()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))  # > 16 rows: prefill tiles
    atol = 2e-3 if mode == "int8" else 1e-2
    with torch.inference_mode():
        modules, planned = model.new_cache(2, 64), model.new_cache(2, 64)
        for chunk in (ids[:, :20], ids[:, 20:]):  # two rows: attention in torch, causal, then past 20 cached
            torch.testing.assert_close(decoder.step(chunk, planned, last_only=True),
                                       model(chunk, cache=modules, last_only=True), rtol=0, atol=atol)
        ids = ids[:1]
        modules, planned = model.new_cache(1, 64), model.new_cache(1, 64)
        for chunk in (ids[:, :30], ids[:, 30:]):  # from an empty cache, then after 30 cached positions
            want = model(chunk, cache=modules, last_only=True)
            got = decoder.step(chunk, planned, last_only=True)
            assert got.shape == want.shape == (1, 1, VOCAB)
            torch.testing.assert_close(got, want, rtol=0, atol=atol)
            assert planned.length == modules.length and torch.equal(planned.valid_count, modules.valid_count)
            assert torch.equal(planned.k[0], modules.k[0]) and torch.equal(planned.v[0], modules.v[0])
            for k, v, k_, v_ in zip(planned.k, planned.v, modules.k, modules.v):
                torch.testing.assert_close(k.float(), k_.float(), rtol=0, atol=atol)
                torch.testing.assert_close(v.float(), v_.float(), rtol=0, atol=atol)
        assert len(ran) == 4
        assert decoder.step(ids, model.new_cache(1, 64)).shape == (1, 40, VOCAB) and len(ran) == 4
    greedy = GenerationConfig(max_new_tokens=12)
    prompt = ids[0, :24].tolist()
    assert generate_ids(model, [prompt], greedy, pack=True) == generate_ids(model, [prompt], greedy, pack=False)


def test_greedy_generation_with_plan_matches_without(model_and_hf):
    model, hf = model_and_hf
    prompt = [9, 8, 7, 6, 5]
    release(model)
    plain = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=20), pack=False)
    planned = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=20), pack=True)
    assert plan_of(model) is not None
    assert planned == plain == hf_greedy(hf, [prompt], 20)


# ---- who holds a plan ------------------------------------------------------------------------------------------
def test_a_plan_is_reused_per_model_and_does_not_keep_it_alive():
    model = spread_model()
    decoder = Decoder.build(model)
    assert Decoder.build(model).plan is decoder.plan  # no second copy of the weights while they are unchanged
    assert Decoder.build(model, "plain").plan is not decoder.plan and decoder.plan.released  # another kernel
    alive = weakref.ref(model)
    del model, decoder
    gc.collect()
    assert alive() is None  # the per-model plan table holds models weakly, and a plan holds no model


def test_release_frees_the_plan_for_every_holder():
    from phiforge.serve.quant import quantize

    model = spread_model()
    plain = decode_logits(model, IDS)
    a, b = Decoder.build(model), Decoder.build(model)
    a.release()
    assert a.plan is None and b.plan.released and plan_of(model) is None
    torch.testing.assert_close(decode_logits(model, IDS, b), plain, rtol=0, atol=0)  # b runs the modules now
    assert b.plan is None
    c = Decoder.build(model)
    quantize(model, "int8")  # replaces the linears the plan copied: quantize frees the copies at once
    assert c.plan.released and plan_of(model) is None


def test_a_plan_never_serves_all_positions_or_autograd():
    model = spread_model()
    decoder = Decoder.build(model)
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        prefill = decoder.step(IDS, cache)
    assert prefill.shape == (1, IDS.shape[1], VOCAB)  # all positions: the model's forward ran
    step = decoder.step(IDS[:, :1], cache)  # autograd on: the modules run, with a graph
    assert step.requires_grad and decoder.plan is not None
    with torch.no_grad():
        planned = decoder.step(IDS[:, 1:2], cache)
    assert not planned.requires_grad and planned.shape == (1, 1, VOCAB)


# ---- exact greedy at every thread count, ties included ----------------------------------------------------------
TIES = """
import sys, torch
from phiforge.decode import Decoder
from phiforge.serve.quant import quantize
from tests.test_decode import greedy_vs_argmax
from tests.test_generate import spread_model

assert torch.get_num_threads() == int(sys.argv[1])
def tied(model):  # rows 40 and 250 of the lm_head identical and on top: an exact tie, lowest id first
    with torch.no_grad():
        model.lm_head.weight[250] = model.lm_head.weight[40]
        model.lm_head.bias[250] = model.lm_head.bias[40] = 40.0
    return model
cases = {"fp32 t": (tied(spread_model()), "t"), "fp32 plain": (tied(spread_model()), "plain"),
         "bf16": (tied(spread_model()).to(torch.bfloat16), None), "int8": (quantize(tied(spread_model()), "int8"), None),
         "int4": (quantize(tied(spread_model()), "int4"), None)}
for name, (model, kernel) in cases.items():
    decoder = Decoder.build(model, kernel)
    assert greedy_vs_argmax(decoder, 3) == [[40, 40]] * 3, name  # asserts each step against the full argmax too
    assert decoder.plan is not None and decoder.plan.fresh(), name
    greedy_vs_argmax(Decoder.build(spread_model(seed=1).to(model.lm_head.weight.dtype
                     if name in ("fp32 t", "fp32 plain", "bf16") else torch.float32), kernel), 8)
print("OK")
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_greedy_ties_are_the_full_argmax_at_every_thread_count(threads):
    """The fast greedy token is torch.argmax of the step's full logits, lowest id on a tie, with torch, MKL and
    the native kernels on 1 and on 2 threads (set before torch starts: OMP_NUM_THREADS, in a fresh process)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", TIES, str(threads)], capture_output=True, text=True, timeout=600,
                         cwd=root, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


@pytest.mark.parametrize("kind,dtype", [("int8", torch.float32), ("int8", torch.bfloat16),
                                        ("bf16", torch.float32)])
def test_argmax_screen_leaves_exact_ties_to_the_full_logits(kind, dtype):
    """Its own recomputation of the candidates sums in another order than the full lm_head (another GEMM
    blocking, another thread count), so on an fp32 tie it cannot know which one the full logits put first: it
    declines and the plan takes the argmax of the full logits. A bf16 lm_head rounds both to the same value
    (unless a rounding boundary lies within the summation error): then the lowest id is certain. Clear winners
    it decides."""
    from phiforge import kernels

    if kind == "int8" and not kernels.available():
        pytest.skip("no C compiler for the native int8 kernel")
    if kind == "bf16" and not mkldnn_bf16():
        pytest.skip(NO_ONEDNN_BF16)
    g = torch.Generator().manual_seed(0)
    V, d = 1024, 64
    w = torch.randn(V, d, generator=g) / d ** 0.5
    b = torch.zeros(V)
    w[900] = w[7]  # the same row twice
    screen = ArgmaxScreen(kind, w.to(dtype), b.to(dtype))
    h = (w[7] * 30).to(dtype)[None]  # rows 7 and 900 on top, exactly tied
    tok = screen.argmax(h)
    assert tok is None if dtype == torch.float32 else tok is None or tok.tolist() == [7]
    h2 = (w[11] * 30).to(dtype)[None]  # row 11 alone on top
    assert screen.argmax(h2).tolist() == [11]
