"""Quantizing while loading (phiforge.checkpoint.load_checkpoint(..., quant=...)): the same codes as quantizing
after a float load, a peak memory near the quantized model's own size (never the float model), weights in the
layout the decode plan reads (so the fast path is taken at any size), and `--quant` on every command that loads a
model, with bad input as one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from phiforge.checkpoint import load_checkpoint, save_checkpoint
from phiforge.decode import DecodePlan, Decoder
from phiforge.serve.quant import QuantLinear, quantize
from tests.test_generate import spread_model

IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


def native() -> bool:
    from phiforge import kernels

    return kernels.available()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint (spread logits) with a tokenizer, stored in fp32."""
    from phiforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["The cat sat on the mat. def add(a, b):\n    return a + b\n"] * 30, 300)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(spread_model(), path, tokenizer=tok)
    return path


def storages(model: torch.nn.Module) -> int:
    """Bytes the model's tensors hold (shared storage counted once)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


# ---- the same model as quantizing after a float load, in the decode plan's layout ------------------------------
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_load_is_quantize_after_load(ckpt, mode):
    loaded = load_checkpoint(ckpt, quant=mode)
    after = quantize(load_checkpoint(ckpt), mode)
    assert loaded.quant_mode == mode
    assert not any(type(m) is torch.nn.Linear for m in loaded.modules())  # every linear quantized, lm_head too
    a, b = loaded.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.inference_mode():
        torch.testing.assert_close(loaded(IDS), after(IDS), rtol=0, atol=0)
    # a layer's q, k, v and fc1 codes are rows of one buffer: the decode plan reads them without a copy
    layer = loaded.model.layers[0]
    group = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.fc1]
    if group[0].kernel in ("q8", "q4"):
        from phiforge.decode.linear import rows_view

        assert rows_view([lin.qweight for lin in group]) is not None
        assert DecodePlan.copy_bytes(loaded, "t") == 0


def test_quantized_load_decodes_on_the_plan_without_copies(ckpt):
    if not native():
        pytest.skip("no C compiler for the native kernels")
    model = load_checkpoint(ckpt, quant="int8", layout="decode")
    q = model.model.layers[0].self_attn.q_proj
    decoder = Decoder.build(model)
    parts = decoder.plan.layers[0][3].parts  # the fused q|k|v|fc1 matmul's (codes, scales, bias)
    assert parts[0].data_ptr() == q.qweight.data_ptr()  # the layers' own codes, not a copy
    assert decoder.plan.native is not None and "native int8 stack" in decoder.describe()


def test_fp32_decode_layout_is_the_same_model_with_no_weight_copies(ckpt):
    plain = load_checkpoint(ckpt)
    laid = load_checkpoint(ckpt, layout="decode")
    w = laid.model.layers[0].self_attn.q_proj.weight
    assert w.shape == plain.model.layers[0].self_attn.q_proj.weight.shape and not w.is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(laid(IDS), plain(IDS), rtol=1e-5, atol=1e-5)
    weights = sum(p.numel() * 4 for n, p in plain.named_parameters() if p.dim() == 2 and "embed" not in n)
    assert DecodePlan.copy_bytes(plain, "t") >= weights  # the module layout: the plan copies every weight
    # the decode layout: the argmax screen's int8 copy of the lm_head at most, no weight copies
    assert DecodePlan.copy_bytes(laid, "t") <= laid.lm_head.weight.numel() * 2
    from phiforge.generate import GenerationConfig, generate_ids

    cfg = GenerationConfig(max_new_tokens=12)
    assert generate_ids(laid, [[5, 6, 7]], cfg) == generate_ids(plain, [[5, 6, 7]], cfg, pack=False)


def test_bf16_load_converts_block_by_block_into_the_final_tensors(ckpt):
    model = load_checkpoint(ckpt, dtype="bf16")
    ref = load_checkpoint(ckpt).to(torch.bfloat16)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), n


# ---- the fast path at every size: the decision, not the size -------------------------------------------------
def test_the_fast_path_is_taken_above_the_old_copy_limit(ckpt, monkeypatch):
    """A model bigger than PACK_LIMIT_BYTES (phi-2 in int8 is 2.8 GB, over the old 2 GiB) keeps the plan: its
    weights are already in the kernel's layout. Only a plan that would copy more than the limit reads the model's
    own weights instead, and says so."""
    import phiforge.generate as gen
    from phiforge.generate import prepare_decoding

    monkeypatch.setattr(gen, "PACK_LIMIT_BYTES", 1024)  # every model here is far above it
    laid = load_checkpoint(ckpt, layout="decode")
    plain = load_checkpoint(ckpt)
    if native():
        q8 = load_checkpoint(ckpt, quant="int8", layout="decode")
        assert storages(q8) > 1024
        decoder = prepare_decoding(q8)
        assert decoder.plan is not None and decoder.plan.native is not None  # the whole native int8 stack
        assert decoder.describe().startswith("decode: native int8 stack")
    # fp32 in the decode layout: only the screen's copy (V x d int8); with the limit just above it, the "t" plan
    monkeypatch.setattr(gen, "PACK_LIMIT_BYTES", DecodePlan.copy_bytes(laid, "t"))
    assert prepare_decoding(laid).plan.kernel == "t"
    # the module layout would copy every weight: a plan on the model's own weights, and the line says why
    decoder = prepare_decoding(plain)
    assert decoder.plan is not None and decoder.plan.kernel == "plain"
    assert "PACK_LIMIT_BYTES" in decoder.describe() and "would copy" in decoder.describe()
    assert prepare_decoding(plain, pack=False).describe().startswith("module path: ")


# ---- peak memory: RSS high-water mark in a fresh process ---------------------------------------------------------
# The high-water mark is VmHWM of this process's own memory map: getrusage's ru_maxrss would do, but Linux
# carries it over fork + exec, so a child of a big parent (pytest holding models) starts at the parent's size.
# Writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS (Linux >= 4.0); without it the mark since
# exec is only higher, so the bound stays safe.
MEASURE = textwrap.dedent("""
    import json, sys
    mode, path, warm = sys.argv[1:4]
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    from phiforge.checkpoint import load_checkpoint
    kw = {"int8": {"quant": "int8"}, "int4": {"quant": "int4"}, "bf16": {"dtype": "bf16"},
          "fp32": {"layout": "decode"}}[mode]
    load_checkpoint(warm, **kw)  # every lazy import, the native kernels, torch's first allocations
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = status("VmRSS")
    model = load_checkpoint(path, **kw)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*model.parameters(), *model.buffers()]}
    print(json.dumps({"growth": status("VmHWM") - base, "held": sum(held.values())}))
""")


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    """A 350 MB fp32 checkpoint (6 layers of d=1024, MLP 4096, vocab 8192): big enough that holding it in fp32
    once would overshoot every bound below by far more than the slack."""
    from phiforge.config import ModelConfig
    from phiforge.model import Phi

    cfg = ModelConfig(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                      num_attention_heads=16, partial_rotary_factor=0.5, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("big") / "ckpt"
    save_checkpoint(Phi(cfg), path)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
@pytest.mark.parametrize("mode", ["int8", "int4", "bf16", "fp32"])
def test_peak_memory_of_a_load_is_near_the_loaded_model(big_ckpt, ckpt, mode):
    """Peak RSS growth of a load <= 1.25 x the bytes the loaded model holds + 24 MiB. The slack: one 2 MiB block
    read plus up to ~4 float temporaries of its size while it is quantized or converted (READ_BLOCK_BYTES,
    serve/quant.BLOCK_BYTES), and the C heap's free lists and torch's bookkeeping (measured ~4 MiB). The fp32
    file is 352 MiB: an fp32 detour (the old load-then-quantize) would grow by >= 352 MiB against bounds of
    ~165 MiB (int8), ~120 MiB (int4), ~245 MiB (bf16); the fp32 decode layout must not hold a second copy
    (bound ~465 MiB against >= 704 MiB)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, mode, str(big_ckpt), str(ckpt)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    fp32 = 352 * mib
    assert r["held"] < (fp32 if mode != "fp32" else 1.01 * fp32)  # sanity: int8/int4/bf16 hold less than fp32
    assert r["growth"] <= 1.25 * r["held"] + 24 * mib, (mode, r["growth"] / mib, r["held"] / mib)


# ---- --quant on every command that loads a model ------------------------------------------------------------------
def one_error_line(err: str, *says: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phiforge: error: "), err
    for s in says:
        assert s in lines[0], (s, err)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_quant_verbose_says_what_runs(ckpt, mode, capsys):
    from phiforge.cli import main

    assert main(["generate", "--model", str(ckpt), "--quant", mode, "--verbose", "--no-stream",
                 "--max-new-tokens", "4", "The cat"]) == 0
    err = capsys.readouterr().err
    assert f"load: {mode} linear layers" in err and "peak RSS" in err
    line = next(x for x in err.splitlines() if x.startswith(("decode:", "module path:")))
    if native():
        assert line.startswith(f"decode: native {mode} stack (")  # which instruction set, in the brackets


def test_chat_and_serve_load_quantized(ckpt, capsys, monkeypatch):
    from phiforge.cli import main
    from phiforge.commands import chat, serve

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/exit\n"))
    assert main(["chat", "--model", str(ckpt), "--quant", "int4", "--max-new-tokens", "3"]) == 0
    for mode in ("int8", "int4"):
        args = _parse(serve, "--model", str(ckpt), "--quant", mode)
        engine = chat.load_engine_from(args)
        assert {m.mode for m in engine.model.modules() if isinstance(m, QuantLinear)} == {mode}
        line = serve.decode_line(engine)  # the server's startup line about decoding
        assert line.startswith("decode: ") and (not native() or "native" in line)


def _parse(module, *argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_serve_startup_line_names_the_decode_path(ckpt):
    """`phiforge serve --quant int8` as a user starts it: it serves, and its second line says how it decodes."""
    proc = subprocess.Popen([sys.executable, "-m", "phiforge", "serve", "--model", str(ckpt), "--quant", "int8",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "serving" in first, (first, proc.stderr.read())
    assert second.startswith("decode: "), second
    assert not native() or "native int8 stack" in second


def test_eval_loads_quantized(ckpt):
    from phiforge.commands import eval as eval_cmd
    from phiforge.lm.base import GenRequest
    from phiforge.lm.sampling import Sampling
    from phiforge.lm.spec import load_lm

    assert _parse(eval_cmd, "--quant", "int4").quant == "int4"
    assert _parse(eval_cmd).quant == "none"
    lm = load_lm(str(ckpt), quant="int8")
    assert lm.model.quant_mode == "int8" and ":int8:" in lm.identity  # cached results kept apart from fp32's
    assert load_lm(str(ckpt)).identity != lm.identity
    out = lm.generate_until([GenRequest("The cat", Sampling(max_new_tokens=3))])
    assert len(out) == 1 and isinstance(out[0], str)
    [(ll, _)] = lm.loglikelihood([("The cat", " sat")])
    assert ll < 0


def test_export_quant_int8_int4_mean_the_gguf_types(ckpt, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    from phiforge.cli import main

    for mode, kind in (("int8", "Q8_0"), ("int4", "Q4_0")):
        out = tmp_path / f"{mode}.gguf"
        assert main(["export", "gguf", "--model", str(ckpt), "--out", str(out), "--quant", mode]) == 0, \
            capsys.readouterr().err
        types = {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
        assert kind in types, types


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "eval", "export"])
def test_bad_quant_is_one_clear_line(command, ckpt, capsys):
    """`--quant int3` is refused by the flag's own parser in one line (`phiforge: error: ...`, exit 2, no usage
    dump) that names the choices; export's --quant names GGUF types and says that int8 / int4 mean q8_0 / q4_0."""
    from phiforge.cli import main

    argv = {"generate": ["--model", str(ckpt), "x"], "chat": ["--model", str(ckpt)],
            "serve": ["--model", str(ckpt)], "eval": ["--model", str(ckpt), "--tasks", "arc_easy"],
            "export": ["gguf", "--model", str(ckpt), "--out", "x.gguf"]}[command]
    with pytest.raises(SystemExit) as e:
        main([command, *argv, "--quant", "int3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("phiforge: error: "), err
    assert "--quant: invalid choice: 'int3'" in errors[0], err
    assert ("int8 = q8_0" in errors[0]) if command == "export" else ("none, int8, int4" in errors[0])


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "eval"])
def test_quant_of_a_transformers_model_is_one_line(command, capsys, tmp_path):
    """--quant is for phiforge checkpoints: on a model that runs through transformers it is one line, exit 2,
    before anything is loaded (a GGUF path that does not need to be a real model: nothing reads it)."""
    from phiforge.cli import main

    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    argv = {"generate": [str(fake), "x"], "chat": [], "serve": ["--port", "0"],
            "eval": ["--tasks", "arc_easy"]}[command]
    argv = argv if command == "generate" else ["--model", str(fake), *argv]
    if command == "generate":
        argv = ["--model", *argv]
    assert main([command, *argv, "--quant", "int4"]) == 2
    one_error_line(capsys.readouterr().err, "--quant int4 is for phiforge checkpoints", "transformers")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA: --device cuda is supported here")
@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_device_without_cuda_is_one_line(command, ckpt, capsys):
    from phiforge.cli import main

    extra = {"generate": ["x"], "chat": [], "eval": ["--tasks", "arc_easy"]}[command]
    assert main([command, "--model", str(ckpt), "--quant", "int8", "--device", "cuda", *extra]) == 2
    one_error_line(capsys.readouterr().err, "--device cuda", "no CUDA")
