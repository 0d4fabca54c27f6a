"""Fine-tuning examples: prompt/completion and chat records -> token ids with a per-token loss mask.

Two record formats (JSONL, one object a line):

    completion   {"prompt": "def add(a, b):\\n    \\"\\"\\"Add.\\"\\"\\"\\n", "completion": "    return a + b\\n"}
    chat         {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

A record becomes segments of text, each trained or not: a completion record is (prompt, no) + (completion, yes);
a chat record is rendered by a template, which is data (phiforge/data/templates/*.yaml or your own YAML):

    roles:
      user: {text: "Instruct: {content}\\n"}                             # not trained
      assistant: {prefix: "Output:", text: " {content}\\n", train: true}  # prefix not trained, text trained

Each segment is tokenized on its own (so the mask boundary is a token boundary), EOS is appended and trained: the
loss mask is 1 on completion tokens and EOS, 0 on the prompt. An example longer than `max_tokens` is fitted by
`fit_example`: "truncate" cuts prompt tokens from the left (never a trained token), "drop" drops it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiforge.errors import ConfigError

RECORD_FORMATS = ("text", "completion", "chat")
OVERLONG_RULES = ("truncate", "drop")
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

Segments = list[tuple[str, bool]]  # (text, trained)


@dataclass(frozen=True)
class Role:
    """How one chat role is rendered: `prefix` (never trained), then `text` with {content} replaced."""

    text: str = "{content}"
    prefix: str = ""
    train: bool = False


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    roles: dict[str, Role]
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "roles": {k: {"prefix": r.prefix, "text": r.text, "train": r.train} for k, r in self.roles.items()}}


def shipped_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


def load_template(spec: str | os.PathLike) -> ChatTemplate:
    """A chat template: a shipped name (phi-2, chatml) or a YAML file with a `roles` mapping (ConfigError if bad)."""
    from phiforge.config import read_yaml

    p = Path(spec)
    if not p.exists():
        p = TEMPLATE_DIR / f"{spec}.yaml"
        if not p.exists():
            raise ConfigError(f"{spec}: no such chat template file (shipped: {', '.join(shipped_templates())})")
    data = read_yaml(p, what="chat template keys")
    roles = data.get("roles")
    if not isinstance(roles, dict) or not roles:
        raise ConfigError(f"{p}: a chat template needs a `roles` mapping, e.g. user: {{text: \"{{content}}\\n\"}}")
    out: dict[str, Role] = {}
    for name, r in roles.items():
        if not isinstance(r, dict) or set(r) - {"text", "prefix", "train"}:
            raise ConfigError(f"{p}: role {name!r} must be a mapping of text, prefix, train")
        role = Role(text=str(r.get("text", "{content}")), prefix=str(r.get("prefix", "")), train=bool(r.get("train")))
        if "{content}" not in role.text:
            raise ConfigError(f"{p}: role {name!r}: text {role.text!r} has no {{content}} placeholder")
        out[str(name)] = role
    if not any(r.train for r in out.values()):
        raise ConfigError(f"{p}: no role has `train: true`, so no token would carry the loss")
    return ChatTemplate(name=p.stem, roles=out, description=str(data.get("description", "")))


def record_segments(obj: Any, fmt: str, template: ChatTemplate | None = None) -> Segments | str:
    """The (text, trained) segments of one parsed JSON record, or the reason it is unusable."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if fmt == "completion":
        for key in ("prompt", "completion"):
            if key not in obj:
                return f"field {key!r} missing (a completion record is {{\"prompt\": ..., \"completion\": ...}})"
            if not isinstance(obj[key], str):
                return f"field {key!r} not a string ({type(obj[key]).__name__})"
        return [(obj["prompt"], False), (obj["completion"], True)]
    if fmt == "chat":
        assert template is not None
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            return "field 'messages' missing or not a non-empty list"
        segments: Segments = []
        for i, m in enumerate(messages, 1):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return f"message {i}: expected {{\"role\": ..., \"content\": \"...\"}}"
            role = template.roles.get(m.get("role"))  # type: ignore[arg-type]
            if role is None:
                return (f"message {i}: unknown role {m.get('role')!r} (template {template.name} knows: "
                        f"{', '.join(template.roles)})")
            if role.prefix:
                segments.append((role.prefix, False))
            segments.append((role.text.replace("{content}", m["content"]), role.train))
        if not any(trained for _, trained in segments):
            trained_roles = [k for k, r in template.roles.items() if r.train]
            return f"no {'/'.join(trained_roles)} message: nothing to learn from"
        return segments
    raise ValueError(f"not an example format: {fmt!r}")


def segments_text(segments: Segments) -> str:
    """The example as one string (the train/val split hashes it)."""
    return "".join(text for text, _ in segments)


def tokenize_segments(segment_ids: list[list[int]], segments: Segments, eos: int) -> tuple[list[int], list[int]] | str:
    """Concatenate the segments' token ids, append EOS; mask 1 on trained segments' tokens and EOS.
    Returns the reason instead when a trained segment tokenizes to nothing (an empty completion)."""
    ids: list[int] = []
    mask: list[int] = []
    for seg, (_, trained) in zip(segment_ids, segments):
        if trained and not seg:
            return "completion tokenizes to no tokens (empty completion?)"
        ids.extend(seg)
        mask.extend([int(trained)] * len(seg))
    ids.append(eos)  # the end of every example; trained, so the model learns to stop
    mask.append(1)
    return ids, mask


def fit_example(ids: list[int], mask: list[int], max_tokens: int, overlong: str
                ) -> tuple[list[int], list[int], str]:
    """(ids, mask, what happened: "ok" | "truncated" | "dropped") for an example of at most `max_tokens` tokens.

    "truncate": drop prompt tokens from the left, keeping at least one token before the first trained one (it
    predicts that token); when that is not enough (the trained part alone is too long), the example is dropped.
    "drop": drop every example that is too long."""
    if len(ids) <= max_tokens:
        return ids, mask, "ok"
    if overlong == "truncate":
        cut = len(ids) - max_tokens
        first_trained = mask.index(1)
        if cut <= first_trained - 1:
            return ids[cut:], mask[cut:], "truncated"
    return [], [], "dropped"
