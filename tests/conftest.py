"""Shared fixtures: tiny models built on the fly (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(**overrides):
    from phiforge.config import ModelConfig

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                partial_rotary_factor=0.5, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny_model():
    import torch

    from phiforge.model import Phi

    torch.manual_seed(0)
    model = Phi(tiny_config())
    # Random (not default-initialised) LayerNorm and bias values, so a parity test exercises every parameter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()
