"""Checkpoints: both directions with transformers, shards, dtypes, no double copy, clear errors, original layout."""

from __future__ import annotations

import copy
import json
import re
import socket

import pytest
import torch

from phiforge.checkpoint import (
    INDEX_NAME,
    SAFE_NAME,
    convert_original,
    load_checkpoint,
    save_checkpoint,
    save_model_files,
)
from phiforge.errors import CheckpointError, ConfigError
from phiforge.model import Phi
from tests.conftest import tiny_config

IDS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 128], [1, 2, 3, 4, 5, 6, 7, 8]])


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def as_dtype(model, dtype):
    """A converted copy (Module.to converts in place)."""
    return copy.deepcopy(model).to(dtype)


def hf_load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", **kw).eval()


# ---- both directions with transformers -----------------------------------------------------------------------
def test_transformers_loads_what_we_save(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    hf = hf_load(tmp_path / "ckpt", dtype=torch.float32)
    assert type(hf).__name__ == "PhiForCausalLM"
    torch.testing.assert_close(logits(hf), logits(tiny_model), rtol=1e-5, atol=1e-5)


def test_we_load_what_transformers_saves(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ours")
    hf = hf_load(tmp_path / "ours", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "theirs")
    cfg = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert cfg["model_type"] == "phi"
    model = load_checkpoint(tmp_path / "theirs")
    assert model.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(logits(model), logits(hf), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model), logits(tiny_model), rtol=0, atol=0)


def test_sharded_both_directions(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ours", max_shard_bytes=40_000)
    shards = sorted((tmp_path / "ours").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "ours" / INDEX_NAME).exists()
    assert not (tmp_path / "ours" / SAFE_NAME).exists()
    index = json.loads((tmp_path / "ours" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tiny_model.state_dict())
    torch.testing.assert_close(logits(load_checkpoint(tmp_path / "ours")), logits(tiny_model), rtol=0, atol=0)
    hf = hf_load(tmp_path / "ours", dtype=torch.float32)
    torch.testing.assert_close(logits(hf), logits(tiny_model), rtol=1e-5, atol=1e-5)
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="50KB")
    assert len(list((tmp_path / "theirs").glob("*.safetensors"))) > 1
    assert (tmp_path / "theirs" / INDEX_NAME).exists()
    torch.testing.assert_close(logits(load_checkpoint(tmp_path / "theirs")), logits(tiny_model), rtol=0, atol=0)


# ---- dtypes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                        ("fp16", torch.float16), ("float16", torch.float16),
                                        (torch.bfloat16, torch.bfloat16)])
def test_load_dtype(tiny_model, tmp_path, name, dtype):
    save_checkpoint(tiny_model, tmp_path / "c")
    model = load_checkpoint(tmp_path / "c", dtype=name)
    assert {p.dtype for p in model.parameters()} == {dtype}
    expected = logits(as_dtype(tiny_model, dtype))
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32])
def test_auto_keeps_stored_dtype(tiny_model, tmp_path, stored):
    save_checkpoint(tiny_model, tmp_path / "c", dtype=stored)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == str(stored)[6:]
    for spec in ("auto", None):
        model = load_checkpoint(tmp_path / "c", dtype=spec)
        assert {p.dtype for p in model.parameters()} == {stored}
    assert hf_load(tmp_path / "c", dtype="auto").lm_head.weight.dtype == stored


def test_unknown_dtype_is_a_config_error(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "c")
    with pytest.raises(ConfigError, match="'fp8'"):
        load_checkpoint(tmp_path / "c", dtype="fp8")


# ---- memory: the model is built on the meta device and filled with the tensors read, not copies -------------
def test_load_builds_on_meta_and_assigns_read_tensors(tiny_model, tmp_path, monkeypatch):
    import phiforge.checkpoint as ckpt

    save_checkpoint(tiny_model, tmp_path / "c")
    built_on: list[str] = []
    init = Phi.__init__

    def spy_init(self, config):
        init(self, config)
        built_on.append(self.lm_head.weight.device.type)

    read: dict[str, int] = {}
    iter_tensors = ckpt._iter_tensors

    def spy_iter(*args, **kw):
        for name, t in iter_tensors(*args, **kw):
            read[name] = t.untyped_storage().data_ptr()
            yield name, t

    monkeypatch.setattr(Phi, "__init__", spy_init)
    monkeypatch.setattr(ckpt, "_iter_tensors", spy_iter)
    model = load_checkpoint(tmp_path / "c")  # stored fp32, loaded fp32: no conversion, so no copy at all
    assert built_on == ["meta"], "load_checkpoint must build the model on the meta device"
    params = dict(model.named_parameters())
    assert set(read) == set(params)
    for name, p in params.items():
        assert p.device.type == "cpu"
        assert p.untyped_storage().data_ptr() == read[name], f"{name} was copied after reading"
    # every parameter owns its storage: nothing else (a second model, a state dict copy) holds the weights
    total = sum(p.untyped_storage().nbytes() for p in params.values())
    assert total == sum(p.numel() * p.element_size() for p in params.values())
    assert model.rotary.cos.device.type == "cpu"


# ---- bad input: a CheckpointError / ConfigError naming the file and tensor or field, and no model -----------
@pytest.fixture
def saved(tiny_model, tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(tiny_model, path)
    return path


def expect_error(path, cls, *patterns):
    with pytest.raises(cls) as info:
        load_checkpoint(path)
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    assert "\n" not in msg
    return msg


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nowhere", CheckpointError, re.escape(str(tmp_path / "nowhere")), "no such")


def test_file_instead_of_directory(saved):
    expect_error(saved / "config.json", CheckpointError, re.escape(str(saved / "config.json")), "directory")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    expect_error(saved, CheckpointError, re.escape(str(saved)), "config.json")


def test_invalid_config_json(saved):
    (saved / "config.json").write_text('{"model_type": "phi",\n "hidden_size": }')
    expect_error(saved, CheckpointError, re.escape(str(saved / "config.json")) + ":2", "invalid JSON")


def test_unknown_config_field(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["hiden_size"] = 64
    (saved / "config.json").write_text(json.dumps(cfg))
    expect_error(saved, ConfigError, re.escape(str(saved / "config.json")), "'hiden_size'")


def test_missing_weights(saved):
    (saved / SAFE_NAME).unlink()
    expect_error(saved, CheckpointError, re.escape(str(saved)), "no model weights")


def test_truncated_safetensors(saved):
    f = saved / SAFE_NAME
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    expect_error(saved, CheckpointError, re.escape(str(f)), "corrupt or truncated")


def test_corrupt_header(saved):
    f = saved / SAFE_NAME
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    f.write_bytes(bytes(data))
    expect_error(saved, CheckpointError, re.escape(str(f)), "corrupt or truncated")


def test_garbage_header_length(saved):
    f = saved / SAFE_NAME
    data = bytearray(f.read_bytes())
    data[0:8] = (2**40).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    expect_error(saved, CheckpointError, re.escape(str(f)))


def test_shape_mismatch(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (saved / "config.json").write_text(json.dumps(cfg))
    expect_error(saved, CheckpointError, re.escape(str(saved / SAFE_NAME)), r"model\.layers\.0\.mlp\.fc1\.weight",
                 r"\[256, 64\]", r"\[128, 64\]")


def rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / SAFE_NAME))
    edit(sd)
    save_file(sd, str(path / SAFE_NAME), metadata={"format": "pt"})


def test_missing_key(saved):
    rewrite_weights(saved, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.bias"))
    expect_error(saved, CheckpointError, re.escape(str(saved)),
                 r"missing tensor.*model\.layers\.1\.self_attn\.k_proj\.bias")


def test_unexpected_key(saved):
    rewrite_weights(saved, lambda sd: sd.__setitem__("model.layers.7.extra.weight", torch.zeros(3)))
    expect_error(saved, CheckpointError, re.escape(str(saved / SAFE_NAME)),
                 r"unexpected tensor.*model\.layers\.7\.extra\.weight")


def test_derived_buffers_are_ignored(saved, tiny_model):
    rewrite_weights(saved, lambda sd: sd.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq",
                                                     torch.zeros(8)))
    torch.testing.assert_close(logits(load_checkpoint(saved)), logits(tiny_model), rtol=0, atol=0)


def test_missing_shard(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "c", max_shard_bytes=40_000)
    shard = sorted((tmp_path / "c").glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_error(tmp_path / "c", CheckpointError, re.escape(str(tmp_path / "c" / INDEX_NAME)),
                 re.escape(shard.name))


def test_invalid_index(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "c", max_shard_bytes=40_000)
    (tmp_path / "c" / INDEX_NAME).write_text('{"metadata": {}}')
    expect_error(tmp_path / "c", CheckpointError, re.escape(str(tmp_path / "c" / INDEX_NAME)), "weight_map")


def test_index_naming_wrong_shard_for_a_tensor(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "c", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "c" / INDEX_NAME).read_text())
    names = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == names[0])
    index["weight_map"][key] = names[1]
    (tmp_path / "c" / INDEX_NAME).write_text(json.dumps(index))
    expect_error(tmp_path / "c", CheckpointError, re.escape(names[1]), re.escape(key))


def test_hub_id_does_not_touch_the_network(tmp_path, monkeypatch):
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)  # recorded: resolve_checkpoint turns any download failure into a CheckpointError
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.chdir(tmp_path)  # so "no-such-org/no-such-model" is not a local path
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model: not a local directory"):
        load_checkpoint("no-such-org/no-such-model")
    assert attempts == [], "a hub id reached the network in tests (HF_HUB_OFFLINE=1 is set by conftest)"


# ---- the original microsoft/phi layout ------------------------------------------------------------------------
def to_original_layout(model: Phi, out, dtype=torch.float32):
    """Write `model` as an original microsoft/phi-2 ("phi-msft") checkpoint: the inverse of the conversion."""
    from safetensors.torch import save_file

    c = model.config
    sd = model.state_dict()
    orig = {"transformer.embd.wte.weight": sd["model.embed_tokens.weight"],
            "lm_head.ln.weight": sd["model.final_layernorm.weight"],
            "lm_head.ln.bias": sd["model.final_layernorm.bias"],
            "lm_head.linear.weight": sd["lm_head.weight"], "lm_head.linear.bias": sd["lm_head.bias"]}
    for i in range(c.num_hidden_layers):
        p, o = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            orig[o + f"ln.{kind}"] = sd[p + f"input_layernorm.{kind}"]
            # rows [q all heads | k all heads | v all heads], as the original `(three h d)` rearrange
            orig[o + f"mixer.Wqkv.{kind}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            orig[o + f"mixer.out_proj.{kind}"] = sd[p + f"self_attn.dense.{kind}"]
            orig[o + f"mlp.fc1.{kind}"] = sd[p + f"mlp.fc1.{kind}"]
            orig[o + f"mlp.fc2.{kind}"] = sd[p + f"mlp.fc2.{kind}"]
        orig[o + "mixer.rotary_emb.inv_freq"] = torch.zeros(c.rotary_dim // 2)  # a derived buffer, dropped
    out.mkdir(parents=True)
    save_file({k: v.to(dtype).contiguous() for k, v in orig.items()}, str(out / SAFE_NAME))
    (out / "config.json").write_text(json.dumps({
        "_name_or_path": "microsoft/phi-2", "activation_function": "gelu_new", "architectures": ["PhiForCausalLM"],
        "attn_pdrop": 0.0, "auto_map": {"AutoConfig": "configuration_phi.PhiConfig",
                                        "AutoModelForCausalLM": "modeling_phi.PhiForCausalLM"},
        "embd_pdrop": 0.0, "flash_attn": False, "flash_rotary": False, "fused_dense": False,
        "img_processor": None, "initializer_range": 0.02, "layer_norm_epsilon": c.layer_norm_eps,
        "model_type": "phi-msft", "n_embd": c.hidden_size, "n_head": c.num_attention_heads, "n_head_kv": None,
        "n_inner": None if c.intermediate_size == 4 * c.hidden_size else c.intermediate_size,
        "n_layer": c.num_hidden_layers, "n_positions": c.max_position_embeddings, "resid_pdrop": 0.1,
        "rotary_dim": c.rotary_dim, "tie_word_embeddings": False, "torch_dtype": str(dtype)[6:],
        "transformers_version": "4.35.2", "vocab_size": c.vocab_size}))
    return out


@pytest.mark.parametrize("overrides", [{}, dict(hidden_size=80, partial_rotary_factor=0.4, intermediate_size=320)])
def test_convert_original_layout(tmp_path, overrides):
    torch.manual_seed(0)
    known = Phi(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in known.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src = to_original_layout(known, tmp_path / "orig")
    (src / "tokenizer.json").write_text("{}")  # tokenizer files travel with the conversion
    with pytest.raises(CheckpointError, match="phiforge convert"):
        load_checkpoint(src)
    out = convert_original(src, tmp_path / "hf")
    assert (out / "tokenizer.json").read_text() == "{}"
    model = load_checkpoint(out)
    assert model.config.rotary_dim == known.config.rotary_dim
    assert model.config.resid_pdrop == 0.1
    torch.testing.assert_close(logits(model), logits(known), rtol=0, atol=0)
    torch.testing.assert_close(logits(hf_load(out, dtype=torch.float32)), logits(known), rtol=1e-5, atol=1e-5)


def test_convert_original_dtype_and_errors(tiny_model, tmp_path):
    src = to_original_layout(tiny_model, tmp_path / "orig", dtype=torch.float16)
    out = convert_original(src, tmp_path / "hf", dtype="bf16")
    assert load_checkpoint(out).lm_head.weight.dtype == torch.bfloat16
    out = convert_original(src, tmp_path / "hf16")
    assert load_checkpoint(out).lm_head.weight.dtype == torch.float16  # stored dtype kept by default
    with pytest.raises(CheckpointError, match="already in the HF layout"):
        convert_original(out, tmp_path / "again")
    cfg = json.loads((src / "config.json").read_text())
    cfg["n_embd_typo"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'n_embd_typo'"):
        convert_original(src, tmp_path / "bad")
    del cfg["n_embd_typo"], cfg["n_layer"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="n_layer"):
        convert_original(src, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_convert_original_bad_tensor(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    src = to_original_layout(tiny_model, tmp_path / "orig")
    sd = load_file(str(src / SAFE_NAME))
    sd["transformer.h.0.mixer.Wqkv.weight"] = sd["transformer.h.0.mixer.Wqkv.weight"][:-1]
    save_file(sd, str(src / SAFE_NAME))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.mixer\.Wqkv\.weight"):
        convert_original(src, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_save_model_files_into_existing_dir(tiny_model, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    written = save_model_files(tiny_model, tmp_path, dtype=torch.bfloat16)
    assert {p.name for p in written} == {SAFE_NAME, "config.json"}
    assert (tmp_path / "keep.txt").exists()
    assert load_checkpoint(tmp_path).lm_head.weight.dtype == torch.bfloat16


def test_convert_sequential_original_layout(tiny_model, tmp_path):
    """The first phi-1 / phi-1.5 uploads ("mixformer-sequential") name layers.0 / layers.1..L / layers.L+1."""
    from safetensors.torch import load_file, save_file

    src = to_original_layout(tiny_model, tmp_path / "orig")
    L = tiny_model.config.num_hidden_layers
    renamed = {}
    for k, v in load_file(str(src / SAFE_NAME)).items():
        k = re.sub(r"^transformer\.embd\.", "layers.0.", k)
        k = re.sub(r"^transformer\.h\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + 1}.", k)
        renamed[re.sub(r"^lm_head\.", f"layers.{L + 1}.", k)] = v
    save_file(renamed, str(src / SAFE_NAME))
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "mixformer-sequential"
    cfg["architecture"] = {"block_cls": "parallel", "mixer": {}, "mlp": {"mlp_cls": "mlp"}}
    (src / "config.json").write_text(json.dumps(cfg))
    out = convert_original(src, tmp_path / "hf")
    torch.testing.assert_close(logits(load_checkpoint(out)), logits(tiny_model), rtol=0, atol=0)


def test_convert_checkpoint_resaves_hf_layout(tiny_model, tmp_path):
    from phiforge.checkpoint import convert_checkpoint, stored_dtypes

    save_checkpoint(tiny_model, tmp_path / "c")
    (tmp_path / "c" / "tokenizer.json").write_text("{}")
    out = convert_checkpoint(tmp_path / "c", tmp_path / "bf16", dtype="bf16", max_shard_bytes=40_000)
    assert stored_dtypes(out) == {"bfloat16": len(tiny_model.state_dict())}
    assert (out / INDEX_NAME).exists() and (out / "tokenizer.json").exists()
    expected = logits(as_dtype(tiny_model, torch.bfloat16))
    torch.testing.assert_close(logits(load_checkpoint(out)), expected, rtol=0, atol=0)


def test_non_object_json_files(saved, tiny_model, tmp_path):
    (saved / "config.json").write_text("[1, 2]")
    expect_error(saved, CheckpointError, re.escape(str(saved / "config.json")), "JSON object")
    save_checkpoint(tiny_model, tmp_path / "s", max_shard_bytes=40_000)
    (tmp_path / "s" / INDEX_NAME).write_text("[1, 2]")
    expect_error(tmp_path / "s", CheckpointError, re.escape(str(tmp_path / "s" / INDEX_NAME)))
