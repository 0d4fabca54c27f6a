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


def test_packed_rows_with_block_masks_equal_each_sequence_alone():
    """Examples packed into one row (fine-tuning, eval scoring): a block-diagonal causal mask and positions that
    restart with each example give every example the logits it gets alone."""
    model = randomised(tiny_config(partial_rotary_factor=0.4, hidden_size=80, num_attention_heads=4))
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 5))
    ids = torch.cat([torch.cat([a, b], 1), torch.cat([b, a], 1)])  # (2, 12): a|b and b|a
    doc = torch.tensor([[0] * 7 + [1] * 5, [0] * 5 + [1] * 7])  # (B, T) which example each token is in
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    allowed = causal & (doc[:, :, None] == doc[:, None, :])  # (B, T, T) block-diagonal causal
    pos = torch.stack([torch.cat([torch.arange(7), torch.arange(5)]), torch.cat([torch.arange(5), torch.arange(7)])])
    with torch.no_grad():
        packed = model(ids, attention_mask=allowed[:, None], position_ids=pos)  # (B, 1, T, T) mask
        packed_3d = model.lm_head(model.hidden_states(ids, attention_mask=allowed, position_ids=pos))
        alone_a, alone_b = model(a)[0], model(b)[0]
        causal_only = model(ids, position_ids=pos)  # no block mask: b sees a
        stretched = model(ids, attention_mask=allowed[:, None], position_ids=pos * 2)
    torch.testing.assert_close(packed[0, :7], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, 7:], alone_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1, :5], alone_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1, 5:], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_3d, packed, rtol=0, atol=0)
    assert (causal_only[0, 7:] - alone_b).abs().max() > 1e-3  # the mask mattered
    # rotary is relative (a constant shift within a block changes nothing), so stretch them to see them used
    assert (stretched[0, 1:7] - alone_a[1:]).abs().max() > 1e-3


def test_explicit_mask_with_a_cache_and_bad_masks():
    model = randomised(tiny_config())
    ids = torch.randint(0, 256, (1, 9))
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        full = model(ids)
        first = model(ids[:, :6], attention_mask=torch.ones(6, 6, dtype=torch.bool).tril()[None], cache=cache)
        # the mask covers the cached keys too: (B, 1, T, cached + T)
        rest = model(ids[:, 6:], attention_mask=torch.ones(3, 9, dtype=torch.bool).tril(6)[None, None],
                     cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)
    allowed = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="boolean"):  # an additive float mask is not an "allowed" mask
        model(ids[:, :4], attention_mask=allowed.float())
    with pytest.raises(ValueError, match="L = 4"):
        model(ids[:, :4], attention_mask=allowed[..., :3])
