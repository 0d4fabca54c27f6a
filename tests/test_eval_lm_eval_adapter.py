"""phiforge inside lm-eval: the "phiforge" model scores lm-eval's own requests (built by its task definitions from
hub-layout repositories) with log-likelihoods identical to lm-eval's `hf` model on the same tiny checkpoint, and
lm-eval's evaluator runs it by name."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from tests.test_eval_hub import datasets_cache, hub_root, online_hub  # noqa: F401 - fixtures
from tests.test_eval_prompts import lm_eval_instances

TEXTS = ["Question: Which gas do plants take in from the air?\nAnswer: carbon dioxide", "the cat sat on the mat.",
         "Sarah was a much better surgeon than Maria so Sarah always got the harder cases.",
         "A man is sitting on a roof. he starts pulling up roofing on a roof."] * 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny phiforge checkpoint (HF layout: transformers loads it as PhiForCausalLM) with a trained tokenizer."""
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi
    from phiforge.tokenizer import model_vocab_size, train_tokenizer

    tok = train_tokenizer(TEXTS, 400)
    torch.manual_seed(0)
    model = Phi(tiny_config(vocab_size=model_vocab_size(tok), max_position_embeddings=1024))
    with torch.no_grad():  # peaked, input-dependent distributions: log-likelihoods far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, path, tokenizer=tok)
    return path


def test_phiforge_model_scores_lm_evals_requests_as_its_hf_model(ckpt, online_hub):  # noqa: F811 - fixture imported from test_eval_hub
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    import phiforge.lm.lm_eval_adapter  # noqa: F401 - registers "phiforge"

    ours = get_model("phiforge").create_from_arg_string(f"pretrained={ckpt}", {"batch_size": 4, "device": "cpu"})
    theirs = HFLM(pretrained=str(ckpt), device="cpu", batch_size=4, dtype="float32")
    ll = [i for rel in ("arc/arc_easy.yaml", "hellaswag/hellaswag.yaml", "winogrande/default.yaml",
                        "super_glue/boolq/default.yaml", "mmlu/default/mmlu_anatomy.yaml")
          for insts in lm_eval_instances(online_hub, rel, 5 if "mmlu" in rel else None).values() for i in insts]
    ll += [Instance("loglikelihood", {}, ("Answer: ", "yes"), 0), Instance("loglikelihood", {}, ("", "hello"), 0)]
    a, b = ours.loglikelihood(ll), theirs.loglikelihood(ll)
    assert len(a) == len(b) == len(ll) > 30
    assert [x[0] for x in a] == pytest.approx([float(x[0]) for x in b], abs=1e-4)
    assert [x[1] for x in a] == [bool(x[1]) for x in b]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in TEXTS[:4]]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(theirs.loglikelihood_rolling(rolling), abs=1e-4)
    gen = [Instance("generate_until", {}, ("the cat", {"until": ["."], "max_gen_toks": 8, "do_sample": False}), 0)]
    assert ours.generate_until(gen) == theirs.generate_until(gen)


def test_lm_evals_evaluator_runs_the_phiforge_model_by_name(ckpt, online_hub, tmp_path):  # noqa: F811 - fixture imported from test_eval_hub
    import lm_eval
    from lm_eval.api.task import ConfigurableTask

    import phiforge.lm.lm_eval_adapter  # noqa: F401
    from tests.test_eval_hub import lm_eval_yaml

    cfg = lm_eval_yaml("arc/arc_easy.yaml", resolve=True)
    cfg.pop("tag", None)
    cfg["dataset_path"] = str(online_hub / cfg["dataset_path"])
    out = lm_eval.simple_evaluate(model="phiforge", model_args=f"pretrained={ckpt},cache={tmp_path / 'c.sqlite'}",
                                  tasks=[ConfigurableTask(config=cfg)], batch_size=4)
    acc = out["results"]["arc_easy"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and out["n-samples"]["arc_easy"]["effective"] == 3


def test_module_entry_point_is_lm_evals_cli(monkeypatch, capsys):
    from phiforge.lm import lm_eval_adapter

    with pytest.raises(SystemExit) as e:
        lm_eval_adapter.main(["run", "--help"])
    assert e.value.code == 0 and "--model_args" in capsys.readouterr().out
