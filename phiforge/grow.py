"""Grow a trained small Phi into a larger one ("scaled knowledge transfer", Phi-1.5 -> Phi-2).

Phi-1.5 -> Phi-2 keeps 32 heads and rotary dim 32 but widens d 2048 -> 2560 (head dim 64 -> 80) and deepens
24 -> 32 layers. `grow()` maps a small state dict onto any larger shape, function-preserving where possible, so
continued training starts from the small model's loss instead of from scratch.

Every width change is the same move (Net2Net / HyperCloning): a *unit* (residual channel, MLP hidden unit,
attention head, head channel) is either copied from an old unit or is fresh. The weights that *produce* a unit
are copied; the weights that *consume* it are divided by the number of copies, so the copies sum back to the
original. Where exactness holds, and why:

- MLP hidden units (8192 -> 10240), any ratio: copies of fc1 rows give identical GELU activations, fc2 columns
  divided by the copy count sum back -> EXACT. Fresh units (zero-pad): random fc1 rows, zero fc2 columns -> EXACT.
- Heads (count change), any ratio: a copied head copies its q/k/v rows (same attention pattern and values), the
  dense columns of its copies are divided by the count -> EXACT. Grouped-query models need the same query/kv
  group size in both shapes.
- Head channels (64 -> 80) with the rotary channels kept in place (the first rotary_dim channels of every
  head stay where they are, so NeoX pairs and frequencies are unchanged; requires equal rotary_dim):
  new pass-through channels either copy an old one (its q copies divided by the count, k copied) or are fresh
  (q zero, k random: q.k is unchanged and both get gradients). The softmax scale 1/sqrt(head_dim) changes, so
  q weights and bias are multiplied by sqrt(hd_large / hd_small) -> EXACT. v channels: copied (dense columns
  divided) or fresh (dense columns zero) -> EXACT. A different rotary_dim changes the frequencies -> approximate.
- Residual width d (2048 -> 2560), the hard part, because LayerNorm normalises over all D channels:
  * hyperclone: each old channel is copied k = D // d times and the remaining r = D - k*d channels carry the
    *mean* of the old channels (their producing rows are the mean of the old rows, so by linearity the channel
    holds mean(x) at every layer). Then mean(x') = mean(x) and var(x') = var(x) * k*d/D exactly, so with the
    LayerNorm gain scaled by sqrt(k*d/D) and eps scaled by k*d/D (layer_norm_eps of the grown config: 1e-5 ->
    8e-6 for 2048 -> 2560) every LayerNorm output on the old channels is unchanged, and on the mean channels it
    is 0 (bias 0), so whatever reads them sees nothing -> EXACT for any ratio; for integer ratios (r = 0) eps is
    unchanged. With `adjust_eps=False` the large config's eps is kept: approximate, error ~ eps / var.
  * net2net: channels copied by a random mapping (uneven copy counts) -> LayerNorm statistics are a weighted
    mean/variance -> approximate.
  * zero-pad: new channels are zero -> mean and variance over D differ -> approximate.
- Depth (24 -> 32): new blocks are inserted evenly. identity: a copy of the preceding block with the attention
  dense and fc2 weights AND biases zeroed; a parallel block computes x + attn(h) + mlp(h) = x + 0 + 0 -> EXACT.
  stack: a full copy of the preceding block -> approximate (adds that block's update a second time).
- noise > 0 breaks the symmetry between copies while staying exact: noise of std `noise * std(W)` is added to
  the *consuming* weights of copied units with zero sum over the copies of each unit (the copies carry identical
  activations, so the sum is unchanged). Units without copies get none. Without noise, the copies of a unit
  get identical gradients and stay identical under AdamW, so a pure x2 clone keeps the small model's capacity;
  train with noise > 0 (fresh and mean channels break the symmetry by themselves).

Exactness is "up to float rounding" and in eval mode (dropout, e.g. phi-2's resid_pdrop 0.1, acts only in
training); tests check logits and validation loss with assert_close in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from phiforge.config import ModelConfig
from phiforge.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from phiforge.model import Phi

WIDTH_METHODS = ("hyperclone", "net2net", "zero-pad")
DEPTH_METHODS = ("identity", "stack")
FRESH, MEAN = -1, -2  # UnitMap.src codes: a new unit (random or zero), a residual channel holding the mean


@dataclass
class GrowPart:
    """One part of the model's growth: what was done and whether it preserves the function exactly."""

    name: str
    exact: bool
    how: str


@dataclass
class GrowReport:
    """Which parts of a growth are exact, plus the grown config (its layer_norm_eps may be adjusted)."""

    config: ModelConfig
    parts: list[GrowPart] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return all(p.exact for p in self.parts)

    def add(self, name: str, exact: bool, how: str) -> None:
        self.parts.append(GrowPart(name, exact, how))

    def format(self) -> str:
        width = max(len(p.name) for p in self.parts) if self.parts else 4
        lines = [f"  {p.name.ljust(width)}  {'exact ' if p.exact else 'approx'}  {p.how}" for p in self.parts]
        verdict = "function-preserving (exact up to float rounding)" if self.exact else "approximate"
        return "\n".join([f"growth is {verdict}:", *lines])

    def to_dict(self) -> dict:
        return {"exact": self.exact, "config": self.config.to_dict(),
                "parts": [{"name": p.name, "exact": p.exact, "how": p.how} for p in self.parts]}


# ---- planning (no torch) -----------------------------------------------------------------------------------
def _residual_copies(d: int, D: int, width_method: str) -> int:
    """How many new residual channels are copies of old ones (the rest are mean or zero channels)."""
    if width_method == "hyperclone":
        return (D // d) * d
    return D if width_method == "net2net" else d


def plan_growth(small_cfg: ModelConfig, large_cfg: ModelConfig, *, width_method: str = "hyperclone",
                depth_method: str = "identity", noise: float = 0.0, adjust_eps: bool = True,
                residual_method: str | None = None) -> GrowReport:
    """Check that small -> large is a growth and say, part by part, what is exact. Raises ConfigError.

    `residual_method` (default: `width_method`) fills the residual channels; `width_method` the heads, head
    channels and MLP units."""
    s, g = small_cfg, large_cfg
    residual_method = residual_method or width_method
    for what, method in (("width", width_method), ("residual", residual_method)):
        if method not in WIDTH_METHODS:
            raise ConfigError(f"unknown {what} method {method!r} (choose from {', '.join(WIDTH_METHODS)})")
    if depth_method not in DEPTH_METHODS:
        raise ConfigError(f"unknown depth method {depth_method!r} (choose from {', '.join(DEPTH_METHODS)})")
    if noise < 0:
        raise ConfigError(f"noise must be >= 0, got {noise}")
    if s.vocab_size != g.vocab_size:
        raise ConfigError(f"vocab_size differs: small {s.vocab_size}, large {g.vocab_size} (the grown model "
                          f"keeps the small model's tokenizer; set the large config's vocab_size to "
                          f"{s.vocab_size})")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads"):
        if getattr(g, name) < getattr(s, name):
            raise ConfigError(f"{name} shrinks from {getattr(s, name)} to {getattr(g, name)}: grow only grows")
    if g.head_dim < s.head_dim:
        raise ConfigError(f"head_dim shrinks from {s.head_dim} to {g.head_dim}: grow only grows")
    if g.rotary_dim < s.rotary_dim or g.head_dim - g.rotary_dim < s.head_dim - s.rotary_dim:
        raise ConfigError(f"rotary dim {s.rotary_dim} -> {g.rotary_dim} with head_dim {s.head_dim} -> "
                          f"{g.head_dim}: the rotary and pass-through parts of a head may only grow")
    rep_s = s.num_attention_heads // s.num_key_value_heads
    rep_g = g.num_attention_heads // g.num_key_value_heads
    if rep_s != rep_g:
        raise ConfigError(f"query heads per kv head change from {rep_s} to {rep_g}: grow needs the same "
                          f"grouped-query ratio (num_attention_heads / num_key_value_heads)")
    if s.qk_layernorm or g.qk_layernorm:
        raise ConfigError("growing models with qk_layernorm is not supported")
    if s.tie_word_embeddings or g.tie_word_embeddings:
        raise ConfigError("growing models with tie_word_embeddings is not supported (Phi never ties)")

    d, D = s.hidden_size, g.hidden_size
    copies = _residual_copies(d, D, residual_method)
    ratio = copies / D  # var(x') / var(x) for hyperclone: the factor LayerNorm gain and eps are scaled by
    eps = s.layer_norm_eps * ratio if adjust_eps else g.layer_norm_eps
    report = GrowReport(config=g.replace(layer_norm_eps=eps))

    # Residual stream.
    if d == D:
        report.add("residual", True, f"d {d} unchanged")
    elif residual_method == "hyperclone":
        k, r = D // d, D - (D // d) * d
        how = f"d {d} -> {D}: each channel copied {k}x" + (f" + {r} mean channels" if r else "")
        if r:
            how += f"; LayerNorm gain x sqrt({copies}/{D}), eps x {copies}/{D}"
        report.add("residual", True, how)
    elif residual_method == "net2net":
        report.add("residual", False, f"d {d} -> {D}: random channel copies; LayerNorm sees a weighted "
                                      f"mean/variance")
    else:
        report.add("residual", False, f"d {d} -> {D}: zero channels change LayerNorm mean/variance")
    if not math.isclose(eps, s.layer_norm_eps * ratio, rel_tol=1e-9):
        report.add("layernorm eps", False, f"{eps:g}, exactness needs {s.layer_norm_eps * ratio:g} "
                                           f"(= {s.layer_norm_eps:g} x {copies}/{D})")
    elif eps != s.layer_norm_eps:
        report.add("layernorm eps", True, f"{s.layer_norm_eps:g} -> {eps:g} (= x {copies}/{D}) in the grown config")

    # Attention.
    H, G = s.num_attention_heads, g.num_attention_heads
    kind = {"hyperclone": "tiled copies", "net2net": "random copies", "zero-pad": "fresh (dense columns 0)"}
    report.add("heads", True, f"{H} -> {G}" + (f": {kind[width_method]}" if G > H else ""))
    hd_s, hd_g = s.head_dim, g.head_dim
    if s.rotary_dim != g.rotary_dim:
        report.add("rotary", False, f"rotary dim {s.rotary_dim} -> {g.rotary_dim} changes the frequencies")
    else:
        report.add("rotary", True, f"rotary dim {s.rotary_dim} kept in place (first channels of each head)")
    if hd_g != hd_s:
        new = {"hyperclone": "tiled copies (q / count, k copied)", "net2net": "random copies (q / count)",
               "zero-pad": "fresh: q 0, k random; v random, dense columns 0"}
        report.add("head channels", True, f"head_dim {hd_s} -> {hd_g}: pass-through channels "
                                          f"{hd_s - s.rotary_dim} -> {hd_g - g.rotary_dim}, {new[width_method]}; "
                                          f"q x sqrt({hd_g}/{hd_s}) for the softmax scale")
    # MLP.
    F_s, F_g = s.intermediate_size, g.intermediate_size
    report.add("mlp", True, f"intermediate {F_s} -> {F_g}" + (f": {kind[width_method]}".replace("dense", "fc2")
                                                              if F_g > F_s else ""))
    # Depth.
    L_s, L_g = s.num_hidden_layers, g.num_hidden_layers
    if L_g == L_s:
        report.add("depth", True, f"{L_s} layers unchanged")
    elif depth_method == "identity":
        report.add("depth", True, f"{L_s} -> {L_g} layers: {L_g - L_s} identity blocks (copy of the previous "
                                  f"block, dense and fc2 weights+biases zero)")
    else:
        report.add("depth", False, f"{L_s} -> {L_g} layers: {L_g - L_s} stacked copies of the previous block")
    # Numerics that no mapping can fix.
    for name in ("hidden_act", "rope_theta"):
        if getattr(s, name) != getattr(g, name):
            report.add(name, False, f"{getattr(s, name)} -> {getattr(g, name)}")
    if noise > 0:
        report.add("noise", True, f"std {noise:g} x std(W), zero-sum over the copies of each unit")
    return report


def layer_plan(n_small: int, n_large: int) -> list[tuple[int, bool]]:
    """For each large layer: (source small layer, is_new). New layers are spread evenly, each after its source."""
    n_new = n_large - n_small
    after = [0] * n_small
    for t in range(n_new):  # insert after every (n_small / n_new)-th block; several after one block if n_new > n
        after[(t + 1) * n_small // n_new - 1] += 1
    plan: list[tuple[int, bool]] = []
    for j in range(n_small):
        plan.append((j, False))
        plan.extend((j, True) for _ in range(after[j]))
    return plan


# ---- unit maps -----------------------------------------------------------------------------------------------
class UnitMap:
    """How n_old units become n_new: src[i] is the old unit copied into new unit i, FRESH or MEAN."""

    def __init__(self, src: list[int], n_old: int) -> None:
        import torch

        self.src = torch.tensor(src, dtype=torch.long)
        self.n_old = n_old
        copied = self.src[self.src >= 0]
        self.counts = torch.bincount(copied, minlength=n_old).float()  # copies of each old unit

    @classmethod
    def build(cls, n_old: int, n_new: int, method: str, gen: torch.Generator, *, residual: bool = False) -> UnitMap:
        import torch

        extra = n_new - n_old
        if method == "hyperclone":
            if residual:  # k full copies, the remainder holds the mean (LayerNorm-exact, see module docstring)
                k = n_new // n_old
                return cls([i % n_old for i in range(k * n_old)] + [MEAN] * (n_new - k * n_old), n_old)
            return cls([i % n_old for i in range(n_new)], n_old)  # tiled: unit i copies old unit i mod n
        if method == "net2net":
            return cls(list(range(n_old)) + torch.randint(n_old, (extra,), generator=gen).tolist(), n_old)
        return cls(list(range(n_old)) + [FRESH] * extra, n_old)

    def offset(self, start: int, total_old: int) -> UnitMap:
        """This map shifted to start at old unit `start` (for a slice of a larger axis)."""
        src = [s + start if s >= 0 else s for s in self.src.tolist()]
        return UnitMap(src, total_old)

    @staticmethod
    def concat(maps: list[UnitMap], n_old: int) -> UnitMap:
        return UnitMap([s for m in maps for s in m.src.tolist()], n_old)


def _std(t: torch.Tensor) -> float:
    return float(t.float().std()) if t.numel() > 1 else 0.0


def produce(t: torch.Tensor, m: UnitMap, dim: int, *, fresh_std: float, gen: torch.Generator) -> torch.Tensor:
    """Grow the axis `dim` of weights that PRODUCE the units: copies copied, MEAN = mean over old, FRESH random."""
    import torch

    x = t.movedim(dim, 0)  # (n_old, ...)
    out = x[m.src.clamp(min=0)].clone()  # (n_new, ...)
    mean = m.src == MEAN
    if mean.any():
        out[mean] = x.mean(0, keepdim=True).expand(int(mean.sum()), *x.shape[1:])
    fresh = m.src == FRESH
    if fresh.any():
        shape = (int(fresh.sum()), *x.shape[1:])
        out[fresh] = torch.randn(shape, generator=gen) * fresh_std if fresh_std > 0 else torch.zeros(shape)
    return out.movedim(0, dim)


def consume(t: torch.Tensor, m: UnitMap, dim: int, *, fresh_std: float, noise: float,
            gen: torch.Generator) -> torch.Tensor:
    """Grow the axis `dim` of weights that CONSUME the units: copies divided by their count (+ zero-sum noise);
    FRESH / MEAN units get `fresh_std` random values (their input is 0, so any value is exact) or zeros."""
    import torch

    x = t.movedim(dim, 0)  # (n_old, ...)
    copied = m.src >= 0
    idx = m.src.clamp(min=0)
    scale = (1.0 / m.counts.clamp(min=1))[idx].view(-1, *([1] * (x.dim() - 1)))
    out = x[idx] * scale  # (n_new, ...)
    if noise > 0 and bool((m.counts > 1).any()):
        n = torch.randn(out.shape, generator=gen) * (noise * _std(x))
        n[~copied] = 0
        group_sum = torch.zeros_like(x).index_add_(0, idx[copied], n[copied])  # (n_old, ...)
        n[copied] -= (group_sum / m.counts.clamp(min=1).view(-1, *([1] * (x.dim() - 1))))[idx[copied]]
        out = out + n
    rest = ~copied
    if rest.any():
        shape = (int(rest.sum()), *x.shape[1:])
        out[rest] = torch.randn(shape, generator=gen) * fresh_std if fresh_std > 0 else torch.zeros(shape)
    return out.movedim(0, dim)


# ---- the growth ----------------------------------------------------------------------------------------------
def grow(small_state: dict[str, torch.Tensor], small_cfg: ModelConfig, large_cfg: ModelConfig, *,
         width_method: str = "hyperclone", depth_method: str = "identity", noise: float = 0.0, seed: int = 0,
         adjust_eps: bool = True, residual_method: str | None = None
         ) -> tuple[dict[str, torch.Tensor], GrowReport]:
    """Map a small model's state dict onto `large_cfg`'s shapes. Returns (large state dict, report).

    Build the large model from `report.config` (its layer_norm_eps is scaled for exact non-integer residual
    growth; see the module docstring). Pure: the inputs are not modified.
    """
    import torch

    from phiforge.progress import progress

    residual_method = residual_method or width_method
    report = plan_growth(small_cfg, large_cfg, width_method=width_method, depth_method=depth_method, noise=noise,
                         adjust_eps=adjust_eps, residual_method=residual_method)
    s, g = small_cfg, report.config
    gen = torch.Generator().manual_seed(seed)
    d, D = s.hidden_size, g.hidden_size
    H_s, H_g, KV_s, KV_g = s.num_attention_heads, g.num_attention_heads, s.num_key_value_heads, g.num_key_value_heads
    hd_s, hd_g, rd = s.head_dim, g.head_dim, s.rotary_dim
    rep = H_s // KV_s

    # Unit maps for every axis (built once: all layers grow the same way, so copies stay aligned across layers).
    res = UnitMap.build(d, D, residual_method, gen, residual=True)
    kv_heads = UnitMap.build(KV_s, KV_g, width_method, gen)
    # Query heads follow their kv group, so each copied query head still reads a copy of its own kv head.
    kv_of = [int(kv_heads.src[h // rep]) for h in range(H_g)]  # old kv head behind new query head h
    heads = UnitMap([kv * rep + h % rep if kv >= 0 else FRESH for h, kv in enumerate(kv_of)], H_s)
    # Head channels: rotary part in place (halves re-aligned if rotary_dim grows), pass-through part grown.
    rg = g.rotary_dim
    rot = [i if i < rd // 2 else FRESH for i in range(rg // 2)]
    rot += [rd // 2 + i if i < rd // 2 else FRESH for i in range(rg // 2)]
    pass_map = UnitMap.build(hd_s - rd, hd_g - rg, width_method, gen).offset(rd, hd_s)
    chans = UnitMap.concat([UnitMap(rot, hd_s), pass_map], hd_s)
    mlp = UnitMap.build(s.intermediate_size, g.intermediate_size, width_method, gen)
    q_scale = math.sqrt(hd_g / hd_s)  # keeps q.k / sqrt(head_dim) unchanged
    ln_gain = math.sqrt(_residual_copies(d, D, residual_method) / D)

    def f32(name: str) -> torch.Tensor:
        return small_state[name].detach().to("cpu", torch.float32)

    def res_produce(t: torch.Tensor, dim: int) -> torch.Tensor:
        return produce(t, res, dim, fresh_std=0.0, gen=gen)  # zero-pad: new residual channels stay 0

    def res_consume(t: torch.Tensor, dim: int) -> torch.Tensor:
        return consume(t, res, dim, fresh_std=_std(t), noise=noise, gen=gen)

    def layernorm(prefix: str) -> dict[str, torch.Tensor]:
        w, b = f32(prefix + ".weight"), f32(prefix + ".bias")
        w2 = produce(w, res, 0, fresh_std=0.0, gen=gen) * ln_gain
        w2[res.src == MEAN] = ln_gain  # mean channels normalise to exactly 0; gain is free (kept non-zero)
        b2 = produce(b, res, 0, fresh_std=0.0, gen=gen)
        b2[res.src < 0] = 0.0  # ... and bias 0, so their LayerNorm output is 0 (zero-pad: gain 0 too)
        return {prefix + ".weight": w2, prefix + ".bias": b2}

    def heads_axes(t: torch.Tensor, hm: UnitMap, n_old: int, *, q: bool, fresh_std: float) -> torch.Tensor:
        """Rows of q/k/v (n_heads*hd, ...) grown per head and per channel."""
        x = t.view(n_old, hd_s, *t.shape[1:])  # (heads, hd, ...)
        x = produce(x, hm, 0, fresh_std=fresh_std, gen=gen)  # copied heads are whole copies
        if q:  # q consumes the pass-through channels (k / v produce them)
            x = consume(x, chans, 1, fresh_std=0.0, noise=noise, gen=gen) * q_scale
        else:
            x = produce(x, chans, 1, fresh_std=fresh_std, gen=gen)
        return x.reshape(-1, *t.shape[1:])  # (heads'*hd', ...)

    def layer(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        out = layernorm(p + "input_layernorm")
        a = p + "self_attn."
        for name, hm, n_old in (("q_proj", heads, H_s), ("k_proj", kv_heads, KV_s), ("v_proj", kv_heads, KV_s)):
            w = f32(a + name + ".weight")  # (heads*hd, d)
            w = heads_axes(w, hm, n_old, q=name == "q_proj", fresh_std=_std(w))
            out[a + name + ".weight"] = res_consume(w, 1)
            out[a + name + ".bias"] = heads_axes(f32(a + name + ".bias"), hm, n_old, q=name == "q_proj",
                                                 fresh_std=0.0)
        w = f32(a + "dense.weight").view(d, H_s, hd_s)  # (d, heads, hd): columns consume heads and channels
        w = consume(w, heads, 1, fresh_std=0.0, noise=noise, gen=gen)
        w = consume(w, chans, 2, fresh_std=0.0, noise=noise, gen=gen).reshape(d, H_g * hd_g)
        out[a + "dense.weight"] = res_produce(w, 0)
        out[a + "dense.bias"] = res_produce(f32(a + "dense.bias"), 0)
        m = p + "mlp."
        w = f32(m + "fc1.weight")  # (F, d)
        out[m + "fc1.weight"] = res_consume(produce(w, mlp, 0, fresh_std=_std(w), gen=gen), 1)
        out[m + "fc1.bias"] = produce(f32(m + "fc1.bias"), mlp, 0, fresh_std=0.0, gen=gen)
        w = consume(f32(m + "fc2.weight"), mlp, 1, fresh_std=0.0, noise=noise, gen=gen)  # (d, F')
        out[m + "fc2.weight"] = res_produce(w, 0)
        out[m + "fc2.bias"] = res_produce(f32(m + "fc2.bias"), 0)
        return out

    dtype = small_state["lm_head.weight"].dtype
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": res_produce(f32("model.embed_tokens.weight"), 1),
        **layernorm("model.final_layernorm"),
        "lm_head.weight": res_consume(f32("lm_head.weight"), 1),
        "lm_head.bias": f32("lm_head.bias").clone(),
    }
    grown = [layer(i) for i in progress(range(s.num_hidden_layers), total=s.num_hidden_layers, desc="grow",
                                        unit="layer")]
    for new_i, (src, is_new) in enumerate(layer_plan(s.num_hidden_layers, g.num_hidden_layers)):
        for k, v in grown[src].items():
            name = f"model.layers.{new_i}." + k.split(".", 3)[3]  # "model.layers.{src}.rest" -> rest
            v = v.clone() if is_new else v  # a new block never shares storage with its source
            if is_new and depth_method == "identity" and name.endswith(("self_attn.dense.weight",
                                                                        "self_attn.dense.bias",
                                                                        "mlp.fc2.weight", "mlp.fc2.bias")):
                v.zero_()  # a parallel block whose two outputs are 0 is the identity
            state[name] = v
    return {k: v.to(dtype).contiguous() for k, v in state.items()}, report


def grow_model(small: Phi, large_cfg: ModelConfig, **kwargs) -> tuple[Phi, GrowReport]:
    """Grow a small `Phi` into a new `Phi` of `large_cfg`'s shape (see `grow` for the keyword arguments)."""
    from phiforge.model import init_on_meta

    state, report = grow(small.state_dict(), small.config, large_cfg, **kwargs)
    device = small.lm_head.weight.device
    model = init_on_meta(report.config)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    model.rotary.reset(device)  # the rotary tables are buffers, still on the meta device
    model.train(small.training)
    return model, report
