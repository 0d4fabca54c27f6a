"""The Phi model is exact against transformers' PhiForCausalLM with the same weights."""

from __future__ import annotations

import pytest
import torch

from phiforge.model import Phi
from tests.conftest import tiny_config


def hf_model_from(model: Phi):
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(**{k: v for k, v in model.config.to_hf().items() if k not in ("architectures", "model_type",
                                                                                  "torch_dtype")})
    cfg._attn_implementation = "eager"
    hf = PhiForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def randomised(config) -> Phi:
    torch.manual_seed(0)
    model = Phi(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


CONFIGS = {
    "rotary-0.5": dict(partial_rotary_factor=0.5),
    "rotary-0.4": dict(hidden_size=80, num_attention_heads=4, partial_rotary_factor=0.4),  # head_dim 20 -> 8
    "qk-layernorm": dict(qk_layernorm=True),
    "gqa": dict(num_key_value_heads=2),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_full_forward_matches_transformers(name):
    model = randomised(tiny_config(**CONFIGS[name]))
    hf = hf_model_from(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_incremental_decoding_matches_transformers(name):
    model = randomised(tiny_config(**CONFIGS[name]))
    hf = hf_model_from(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        full = hf(ids).logits
        steps = [model(ids[:, :5], cache=cache)]  # prefill 5, then chunk of 3, then one token at a time
        steps.append(model(ids[:, 5:8], cache=cache))
        for t in range(8, 12):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_unpadded_rows():
    model = randomised(tiny_config(partial_rotary_factor=0.4, hidden_size=80, num_attention_heads=4))
    a = torch.randint(0, 256, (1, 9))
    b = torch.randint(0, 256, (1, 5))
    pad = torch.zeros(1, 4, dtype=torch.long)
    ids = torch.cat([a, torch.cat([pad, b], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        batched = model(ids, attention_mask=mask, cache=cache)
        nxt = torch.randint(0, 256, (2, 1))
        step = model(nxt, attention_mask=torch.ones(2, 1, dtype=torch.long), cache=cache)
        alone_a = model(torch.cat([a, nxt[:1]], 1))
        alone_b = model(torch.cat([b, nxt[1:]], 1))
    torch.testing.assert_close(batched[0], alone_a[0, :9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1, 4:], alone_b[0, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[0, 0], alone_a[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[1, 0], alone_b[0, -1], rtol=1e-5, atol=1e-5)


def test_param_count_formula_matches_module():
    for overrides in ({}, {"num_key_value_heads": 2}, {"qk_layernorm": True}):
        cfg = tiny_config(**overrides)
        assert Phi(cfg).num_params() == cfg.num_params()


def test_phi2_preset_param_count():
    from phiforge.config import preset

    # 2,779,683,840 = all biases + untied lm_head with bias (phi_facts.md); computed, not instantiated.
    assert preset("phi-2").num_params() == 2_779_683_840
    assert preset("phi-2").rotary_dim == 32 and preset("phi-1.5").rotary_dim == 32


def test_context_overflow_is_an_error():
    model = Phi(tiny_config(max_position_embeddings=16))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 17, dtype=torch.long))
