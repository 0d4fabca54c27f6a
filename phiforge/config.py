"""Model configuration: one dataclass, presets that cite their source, and the mapping to HF config.json.

No torch import here: configs are read by the CLI, the run planner and tests that never build a model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from phiforge.errors import ConfigError


@dataclass
class ModelConfig:
    """Shape and numerics of a Phi decoder (parallel attention+MLP blocks sharing one LayerNorm)."""

    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = multi-head attention (= num_attention_heads)
    partial_rotary_factor: float = 0.5  # fraction of each head's channels that get rotary embeddings
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"  # GELU, tanh approximation
    qk_layernorm: bool = False  # LayerNorm over head_dim on q and k (before rotary), as HF's PhiAttention
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False  # Phi never ties; kept for HF compatibility
    bos_token_id: int = 50256  # <|endoftext|> in the CodeGen tokenizer
    eos_token_id: int = 50256
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self._check_types()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    def _check_types(self) -> None:
        """Every field as its type (an integral float is an int, an int a float), or a ConfigError naming the
        field: a config.json edited by hand says which value is wrong, not a TypeError deep in the model."""
        for name, kind in _FIELD_TYPES.items():
            value = getattr(self, name)
            if value is None and name in _NULLABLE:
                continue
            ok = not isinstance(value, bool) or kind is bool
            if kind is int and ok and isinstance(value, float) and value.is_integer():
                value = int(value)
            elif kind is float and ok and isinstance(value, int):
                value = float(value)
            if not ok or not isinstance(value, kind):
                want = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
                raise ConfigError(f"model config field {name!r} should be {want}, got {value!r}")
            setattr(self, name, value)

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Channels per head that are rotated (HF: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count (all biases, untied lm_head with bias)."""
        d, f, L, v = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        attn = (d * d + d) + 2 * (d * kv + kv) + (d * d + d)  # q, k, v, dense
        mlp = (d * f + f) + (f * d + d)
        ln = 2 * d + (4 * self.head_dim if self.qk_layernorm else 0)
        per_layer = attn + mlp + ln
        head = v * d + v + 2 * d  # lm_head with bias + final LayerNorm
        emb = v * d if include_embedding else 0
        return emb + L * per_layer + head

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N (non-embedding N incl. lm_head) + attention scores 12*L*d*T (PaLM App. B)."""
        n = self.num_params(include_embedding=False)
        return 6 * n + 12 * self.num_hidden_layers * self.hidden_size * seq_len

    def validate(self) -> None:
        """Raise ConfigError naming the field if the shapes cannot form a model or a value is out of range."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "num_key_value_heads"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model config field {name!r} must be positive, got {getattr(self, name)!r}")
        for name, (shown, ok) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and ok(value)):
                raise ConfigError(f"model config field {name!r} must be {shown}, got {value!r}")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"model config field {name!r} must be >= 0, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if not 0.0 <= self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"partial_rotary_factor must be in [0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary dim {self.rotary_dim} (head_dim {self.head_dim} x partial_rotary_factor "
                              f"{self.partial_rotary_factor}) must be even")
        if self.hidden_act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (gelu_new, gelu_pytorch_tanh, gelu)")

    # ---- (de)serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from our own field names; unknown keys are an error naming the key and the source."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config field(s) {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(sorted(known))})")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """The HF `PhiConfig` dict (config.json) for this model."""
        return {
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "resid_pdrop": self.resid_pdrop,
            "embd_pdrop": self.embd_pdrop,
            "attention_dropout": self.attention_dropout,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.layer_norm_eps,
            "use_cache": True,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "partial_rotary_factor": self.partial_rotary_factor,
            "qk_layernorm": self.qk_layernorm,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read an HF `PhiConfig` dict (transformers 4.x and 5.x spellings). Unknown fields are errors."""
        if d.get("model_type") not in (None, "phi"):
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected 'phi' "
                              f"(original microsoft/phi checkpoints: run `phiforge convert` first)")
        d = dict(d)
        # transformers >= 5 nests rope settings in rope_parameters.
        rope = d.pop("rope_parameters", None) or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters should be an object, got {rope!r}")
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope_parameters.rope_type {rope.get('rope_type')!r} is not supported")
        scaling = d.pop("rope_scaling", None)
        if scaling:
            raise ConfigError(f"{source}: rope_scaling {scaling!r} is not supported")
        mapped = {
            "rope_theta": rope.get("rope_theta", d.pop("rope_theta", 10000.0)),
            "partial_rotary_factor": rope.get("partial_rotary_factor", d.pop("partial_rotary_factor", 0.5)),
        }
        d.pop("rope_theta", None)
        d.pop("partial_rotary_factor", None)
        eos = d.pop("eos_token_id", 50256)
        mapped["eos_token_id"] = (eos[0] if eos else None) if isinstance(eos, list) else eos
        # Bookkeeping keys HF writes that carry no model shape.
        for k in _HF_IGNORED:
            d.pop(k, None)
        head_dim = d.pop("head_dim", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {', '.join(map(repr, unknown))}")
        d.update(mapped)
        try:
            config = cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if head_dim is not None and head_dim != config.head_dim:
            raise ConfigError(f"{source}: head_dim {head_dim!r} != hidden_size / num_attention_heads "
                              f"({config.head_dim}) is not supported")
        return config

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (unknown names are errors)."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(changes) - known)
        if bad:
            raise ConfigError(f"unknown model config field(s) {', '.join(map(repr, bad))}")
        return dataclasses.replace(self, **changes)


# Each field's type, from its annotation (a string here: "int", "int | None", ...).
_FIELD_TYPES: dict[str, type] = {f.name: {"int": int, "float": float, "bool": bool, "str": str}[
    str(f.type).split(" |")[0]] for f in fields(ModelConfig)}
_NULLABLE = ("num_key_value_heads", "bos_token_id", "eos_token_id")  # None: the default / HF's "not set"
_FLOAT_RANGES = {  # field -> (the range in words, the test); NaN and inf are never in range
    "partial_rotary_factor": ("in [0, 1]", lambda x: 0.0 <= x <= 1.0),
    "rope_theta": ("> 0", lambda x: x > 0.0),
    "layer_norm_eps": ("in (0, 1]", lambda x: 0.0 < x <= 1.0),
    "resid_pdrop": ("in [0, 1)", lambda x: 0.0 <= x < 1.0),
    "embd_pdrop": ("in [0, 1)", lambda x: 0.0 <= x < 1.0),
    "attention_dropout": ("in [0, 1)", lambda x: 0.0 <= x < 1.0),
    "initializer_range": (">= 0", lambda x: x >= 0.0),
}

_HF_IGNORED = (
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "use_cache",
    "auto_map", "pad_token_id", "output_attentions", "output_hidden_states", "return_dict", "is_decoder",
    "tokenizer_class", "_attn_implementation_autoset", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "tie_encoder_decoder", "is_encoder_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "finetuning_task", "prefix", "task_specific_params", "torchscript",
)


def read_yaml(path: str | Path, *, what: str = "settings", mapping: bool = True) -> Any:
    """Parse a YAML file; a missing file, invalid YAML (with file:line) or a non-mapping is a ConfigError.
    (`phiforge.configio.load_yaml` also gives the line of every key.)"""
    from phiforge.configio import load_yaml

    return load_yaml(path, what=what, mapping=mapping).data


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round a tokenizer size up to a multiple of `multiple` (64, as Phi's `pad_vocab_size_multiple`)."""
    return int(math.ceil(n / multiple) * multiple)


# ---- presets ------------------------------------------------------------------------------------------------
# Sources: phi-1 paper (arXiv 2306.11644, "24 layers, hidden 2048, MLP 8192, 32 heads x 64, rotary dim 32");
# phi-1.5 paper (arXiv 2309.05463, "same architecture as phi-1"); microsoft/phi-2 config.json (hidden 2560,
# intermediate 10240, 32 layers, 32 heads, partial_rotary_factor 0.4, resid_pdrop 0.1). All: vocab 51200,
# context 2048, gelu_new, LayerNorm eps 1e-5. See ../shared/reference/phi_facts.md.
PRESETS: dict[str, dict[str, Any]] = {
    "phi-1": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                  partial_rotary_factor=0.5),
    "phi-1.5": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                    partial_rotary_factor=0.5),
    "phi-2": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
                  partial_rotary_factor=0.4, resid_pdrop=0.1),
    # CPU-sized stand-ins (ours). `tiny`/`small` keep Phi's ratios (MLP 4x, rotary on half of each head) and
    # use a small vocab that a locally trained tokenizer fills; tests and the laptop default run use them.
    # phiforge's trained tokenizers put <|endoftext|> at id 0.
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=512,
                 bos_token_id=0, eos_token_id=0),
    "small": dict(vocab_size=8192, hidden_size=384, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=6, partial_rotary_factor=0.5, max_position_embeddings=1024,
                  bos_token_id=0, eos_token_id=0),
    # ~100M parameters at the full Phi vocab: the decode benchmark's subject.
    "phi-100m": dict(hidden_size=640, intermediate_size=2560, num_hidden_layers=10, num_attention_heads=10,
                     partial_rotary_factor=0.5),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name (see PRESETS), with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig(**{**PRESETS[name], **overrides, "name": name})


def load_model_config(spec: str | Path) -> ModelConfig:
    """A preset name, a checkpoint directory (config.json), or a JSON/YAML file of ModelConfig fields."""
    p = Path(spec)
    if str(spec) in PRESETS:
        return preset(str(spec))
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"{spec}: not a preset ({', '.join(PRESETS)}), checkpoint directory or config file")
    if p.suffix in (".yaml", ".yml"):
        data = read_yaml(p, what="model config fields")
    else:
        from phiforge.readers import read_json

        data = read_json(p, what="a model config", error=ConfigError)
    if "model_type" in data or "architectures" in data:
        return ModelConfig.from_hf(data, source=str(p))
    return ModelConfig.from_dict(data, source=str(p))
