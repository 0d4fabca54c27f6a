"""Growth of a small Phi into a larger one: exact modes reproduce logits and val loss; shapes; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from phiforge.cli import main as cli_main
from phiforge.config import ModelConfig
from phiforge.errors import ConfigError
from phiforge.grow import grow, grow_model, layer_plan, plan_growth
from phiforge.model import Phi
from tests.conftest import tiny_config


def trained_like(cfg: ModelConfig, seed: int = 0) -> Phi:
    """A model with non-trivial LayerNorm gains/biases and biases everywhere (as a trained model has)."""
    torch.manual_seed(seed)
    model = Phi(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.mul_(1 + torch.rand_like(p))  # gains spread over [1, 2): duplication must carry them
    return model.eval()


def val_loss(model: Phi, ids: torch.Tensor) -> float:
    logits = model(ids[:, :-1])  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


IDS = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(1))

# (name, small, large, width_method, depth_method[, residual_method]): every combination here must be exact.
EXACT = [
    ("width x2 hyperclone (heads doubled)", tiny_config(),
     tiny_config(hidden_size=128, num_attention_heads=8, intermediate_size=512), "hyperclone", "identity"),
    ("width x2 hyperclone, same heads (head_dim x2, rotary kept)", tiny_config(),
     tiny_config(hidden_size=128, intermediate_size=512, partial_rotary_factor=0.25), "hyperclone", "identity"),
    ("identity depth 2 -> 5", tiny_config(), tiny_config(num_hidden_layers=5), "hyperclone", "identity"),
    ("head_dim 16 -> 20, q scaled (zero-pad channels)", tiny_config(),
     tiny_config(hidden_size=80, partial_rotary_factor=0.4), "hyperclone", "identity"),
    ("mlp 256 -> 400 net2net", tiny_config(), tiny_config(intermediate_size=400), "net2net", "identity"),
    ("mlp 256 -> 400 zero-pad", tiny_config(), tiny_config(intermediate_size=400), "zero-pad", "identity"),
    ("net2net heads/channels/mlp, hyperclone residual (d 64 -> 120: 6x16 -> 6x20)",
     tiny_config(hidden_size=96, num_attention_heads=6),
     tiny_config(hidden_size=160, num_attention_heads=8, intermediate_size=400, partial_rotary_factor=0.4),
     "net2net", "identity", "hyperclone"),
    ("zero-pad heads/channels/mlp, hyperclone residual", tiny_config(hidden_size=96, num_attention_heads=6),
     tiny_config(hidden_size=160, num_attention_heads=8, intermediate_size=400, partial_rotary_factor=0.4),
     "zero-pad", "identity", "hyperclone"),
    ("net2net mlp 256 -> 320, d kept, depth 2 -> 3", tiny_config(),
     tiny_config(intermediate_size=320, num_hidden_layers=3), "net2net", "identity"),
    ("phi-1.5 -> phi-2 ratios (d 64 -> 80, 4x16 -> 4x20, rotary 8, 3 -> 4 layers)",
     tiny_config(num_hidden_layers=3),
     tiny_config(hidden_size=80, intermediate_size=320, num_hidden_layers=4, partial_rotary_factor=0.4),
     "hyperclone", "identity"),
    ("grouped-query x2", tiny_config(num_key_value_heads=2),
     tiny_config(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, intermediate_size=512),
     "hyperclone", "identity"),
    ("grouped-query 4q/2kv -> 8q/4kv net2net, hyperclone residual", tiny_config(num_key_value_heads=2),
     tiny_config(hidden_size=160, num_attention_heads=8, num_key_value_heads=4, partial_rotary_factor=0.4),
     "net2net", "identity", "hyperclone"),
    ("heads 4 -> 6 hyperclone (uneven copies)", tiny_config(),
     tiny_config(hidden_size=96, num_attention_heads=6, intermediate_size=300), "hyperclone", "identity"),
]


@pytest.mark.parametrize("noise", [0.0, 0.05])
@pytest.mark.parametrize("case", EXACT, ids=[c[0] for c in EXACT])
def test_exact_growth_preserves_logits_and_val_loss(case, noise):
    _, small_cfg, large_cfg, wm, dm, *rm = case
    small = trained_like(small_cfg)
    large, report = grow_model(small, large_cfg, width_method=wm, depth_method=dm, noise=noise, seed=3,
                               residual_method=rm[0] if rm else None)
    assert report.exact, report.format()
    # The grown model really has the large shapes (only layer_norm_eps may differ, for non-integer d ratios).
    assert report.config.replace(layer_norm_eps=large_cfg.layer_norm_eps) == large_cfg
    assert large.num_params() == report.config.num_params() > small.num_params()
    with torch.no_grad():
        torch.testing.assert_close(large(IDS), small(IDS), atol=2e-5, rtol=1e-5)
        assert val_loss(large, IDS) == pytest.approx(val_loss(small, IDS), abs=1e-5)


def test_noise_breaks_symmetry_but_keeps_function():
    small_cfg, large_cfg = tiny_config(), tiny_config(hidden_size=128, num_attention_heads=8,
                                                      intermediate_size=512)
    small = trained_like(small_cfg)
    plain, _ = grow(small.state_dict(), small_cfg, large_cfg)
    noisy, _ = grow(small.state_dict(), small_cfg, large_cfg, noise=0.05, seed=1)
    fc2 = "model.layers.0.mlp.fc2.weight"  # (d', F'); columns j and j + 256 are copies of one unit
    torch.testing.assert_close(plain[fc2][:, :256], plain[fc2][:, 256:])
    assert not torch.allclose(noisy[fc2][:, :256], noisy[fc2][:, 256:])
    torch.testing.assert_close(noisy[fc2][:, :256] + noisy[fc2][:, 256:], plain[fc2][:, :256] * 2)
    # The symmetry is broken where it matters: one step of training moves the copies apart.
    for state, separated in ((plain, False), (noisy, True)):
        model = Phi(tiny_config(hidden_size=128, num_attention_heads=8, intermediate_size=512))
        model.load_state_dict(state)
        loss = F.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        loss.backward()
        g = model.model.layers[0].mlp.fc1.weight.grad  # (F', d')
        assert torch.allclose(g[:256], g[256:], atol=1e-7) is not separated


def test_approximate_modes_are_reported_as_such():
    s, big = tiny_config(num_hidden_layers=3), tiny_config(hidden_size=80, intermediate_size=320,
                                                            num_hidden_layers=4, partial_rotary_factor=0.4)
    small = trained_like(s)
    for wm, dm, part in (("zero-pad", "identity", "residual"), ("net2net", "identity", "residual"),
                         ("hyperclone", "stack", "depth")):
        large, report = grow_model(small, big, width_method=wm, depth_method=dm)
        assert not report.exact
        assert [p.name for p in report.parts if not p.exact] == [part]
        with torch.no_grad():
            assert (large(IDS) - small(IDS)).abs().max() > 1e-3  # really not exact
    # Keeping the large config's eps makes the non-integer residual growth approximate, and says so.
    report = plan_growth(s, big, adjust_eps=False)
    assert not report.exact and [p.name for p in report.parts if not p.exact] == ["layernorm eps"]
    # A rotary dim change moves the rotary frequencies: approximate.
    report = plan_growth(tiny_config(), tiny_config(hidden_size=128, intermediate_size=512))
    assert [p.name for p in report.parts if not p.exact] == ["rotary"]


def test_phi15_to_phi2_shapes_and_eps():
    """The real presets: plan only (no 1.3B weights in a unit test); the growth runs on stand-ins above."""
    from phiforge.config import preset

    report = plan_growth(preset("phi-1.5"), preset("phi-2"))
    assert report.exact, report.format()
    assert report.config.layer_norm_eps == pytest.approx(1e-5 * 2048 / 2560)
    assert report.config.replace(layer_norm_eps=1e-5) == preset("phi-2")
    assert "head_dim 64 -> 80" in report.format() and "rotary dim 32 kept" in report.format()


@pytest.mark.slow
def test_phi15_to_phi2_real_widths_end_to_end():
    """Phi-1.5 -> Phi-2 at the real widths (d 2048 -> 2560, 32 heads x 64 -> 80, rotary 32, MLP 8192 -> 10240),
    with 1 -> 2 layers and a small vocabulary so it fits a CI box: still function-preserving."""
    from phiforge.config import preset

    small_cfg = preset("phi-1.5", vocab_size=256, num_hidden_layers=1, max_position_embeddings=64)
    large_cfg = preset("phi-2", vocab_size=256, num_hidden_layers=2, max_position_embeddings=64, resid_pdrop=0.0)
    small = trained_like(small_cfg)
    large, report = grow_model(small, large_cfg)
    assert report.exact, report.format()
    assert large.model.layers[0].self_attn.head_dim == 80 and large.config.rotary_dim == 32
    ids = IDS[:1, :16]
    with torch.no_grad():
        torch.testing.assert_close(large(ids), small(ids), atol=1e-4, rtol=1e-4)


def test_layer_plan_spreads_new_layers():
    assert layer_plan(24, 32) == [(j, new) for j in range(24) for new in ([False, True] if j % 3 == 2 else
                                                                          [False])]
    assert layer_plan(3, 4) == [(0, False), (1, False), (2, False), (2, True)]
    assert layer_plan(2, 5) == [(0, False), (0, True), (1, False), (1, True), (1, True)]
    assert layer_plan(4, 4) == [(j, False) for j in range(4)]


def test_grow_is_pure_and_deterministic():
    s, big = tiny_config(), tiny_config(hidden_size=80, partial_rotary_factor=0.4, intermediate_size=300)
    state = trained_like(s).state_dict()
    before = {k: v.clone() for k, v in state.items()}
    a, _ = grow(state, s, big, width_method="net2net", noise=0.1, seed=7)
    b, _ = grow(state, s, big, width_method="net2net", noise=0.1, seed=7)
    c, _ = grow(state, s, big, width_method="net2net", noise=0.1, seed=8)
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    bf16, _ = grow({k: v.bfloat16() for k, v in state.items()}, s, big)
    assert all(v.dtype == torch.bfloat16 for v in bf16.values())


@pytest.mark.parametrize("bad, match", [
    (dict(vocab_size=512), "vocab_size differs"),
    (dict(hidden_size=32, num_attention_heads=2), "hidden_size shrinks"),
    (dict(num_hidden_layers=1), "num_hidden_layers shrinks"),
    (dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4), "grouped-query ratio"),
    (dict(qk_layernorm=True), "qk_layernorm"),
])
def test_impossible_growth_is_a_config_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        plan_growth(tiny_config(), tiny_config(**bad))


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="width method"):
        plan_growth(tiny_config(), tiny_config(), width_method="magic")
    with pytest.raises(ConfigError, match="depth method"):
        plan_growth(tiny_config(), tiny_config(), depth_method="magic")


def test_cli_grow_end_to_end(tmp_path, capsys):
    from phiforge.checkpoint import load_checkpoint, save_checkpoint

    small_dir, out = tmp_path / "small", tmp_path / "grown"
    small = trained_like(tiny_config(num_hidden_layers=3))
    save_checkpoint(small, small_dir)
    (small_dir / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    big = tiny_config(hidden_size=80, intermediate_size=320, num_hidden_layers=4, partial_rotary_factor=0.4)
    cfg_file = tmp_path / "big.json"
    cfg_file.write_text(json.dumps({k: v for k, v in big.to_dict().items() if k != "name"}))
    rc = cli_main(["grow", "--from", str(small_dir), "--to", str(cfg_file), "--out", str(out), "--verify",
                   "--noise", "0.01"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "function-preserving" in text and "verify: max |logit difference|" in text
    grown = load_checkpoint(out)
    assert grown.config.hidden_size == 80 and grown.config.num_hidden_layers == 4 and grown.config.head_dim == 20
    assert grown.config.rotary_dim == 8
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    report = json.loads((out / "grow_report.json").read_text())
    assert report["exact"] is True and report["width_method"] == "hyperclone"
    with torch.no_grad():
        torch.testing.assert_close(grown(IDS), small(IDS), atol=2e-5, rtol=1e-5)


def test_cli_grow_errors_are_one_line(tmp_path, capsys):
    from phiforge.checkpoint import save_checkpoint

    small_dir = tmp_path / "small"
    save_checkpoint(trained_like(tiny_config()), small_dir)
    rc = cli_main(["grow", "--from", str(small_dir), "--to", "phi-2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "phiforge: error:" in err and "vocab_size" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
