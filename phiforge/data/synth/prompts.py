"""Teacher prompts with diversity by construction: topic x audience x format x sampled constraints.

Everything a prompt is made of is data (phiforge/data/synth/data/*.yaml): the topic tree (domain > subdomain
> topics), audiences with their guidance, formats with their templates, and constraint lists. `PromptSampler`
draws one combination per (seed, index) and fills the format's template, so the same seed always yields the
same prompts, and any prompt can be rebuilt from its index alone.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiforge.errors import ConfigError

# How many words to ask for per token of the teacher's budget (`max_new_tokens`). English runs ~1.3 BPE tokens
# a word, and markdown, lists and numbers add more; asking for about half as many words as tokens leaves room
# for the model to finish its last sentence instead of being cut mid-way.
WORDS_PER_TOKEN = 0.5
DATA_DIR = Path(__file__).parent / "data"
PLACEHOLDERS = {"topic", "subdomain", "domain", "audience", "guidance", "words", "style", "function_name",
                "code_constraint", "names"}


@dataclass(frozen=True)
class Topic:
    domain: str
    subdomain: str
    topic: str


@dataclass
class PromptSpec:
    """One teacher prompt and what it was made of (the record's provenance)."""

    prompt: str
    topic: Topic
    audience: str
    format: str
    kind: str  # "text" or "code" (code is executed and must pass its asserts)
    constraints: dict[str, Any] = field(default_factory=dict)


def _load_yaml(path: Path) -> Any:
    from phiforge.config import read_yaml

    return read_yaml(path, mapping=False)


def load_topics(paths: list[str | Path] | None = None) -> list[Topic]:
    """Topics from one or more tree files (the built-in one when `paths` is empty or ["builtin"])."""
    paths = [DATA_DIR / "topics.yaml" if str(p) == "builtin" else Path(p) for p in (paths or ["builtin"])]
    seen: set[str] = set()
    topics: list[Topic] = []
    for path in paths:
        if path.suffix == ".txt":  # one "domain > subdomain > topic" per line
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                parts = [p.strip() for p in line.split(">")]
                if len(parts) != 3 or not all(parts):
                    raise ConfigError(f"{path}:{n}: expected 'domain > subdomain > topic'")
                if parts[2].lower() not in seen:
                    seen.add(parts[2].lower())
                    topics.append(Topic(*parts))
            continue
        tree = _load_yaml(path)
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping domain -> subdomain -> list of topics")
        for domain, subs in tree.items():
            if not isinstance(subs, dict):
                raise ConfigError(f"{path}: domain {domain!r}: expected a mapping subdomain -> list of topics")
            for sub, items in subs.items():
                if not isinstance(items, list) or not all(isinstance(t, str) and t.strip() for t in items):
                    raise ConfigError(f"{path}: {domain} > {sub}: expected a list of topic strings "
                                      "(quote topics that contain ': ')")
                for t in items:
                    if t.lower() not in seen:  # the first file that names a topic wins
                        seen.add(t.lower())
                        topics.append(Topic(str(domain), str(sub), t.strip()))
    if not topics:
        raise ConfigError(f"{', '.join(map(str, paths))}: no topics")
    return topics


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def load_formats(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Formats by name, each with weight, kind, template and domains; templates are checked here."""
    path = path or DATA_DIR / "formats.yaml"
    formats = _load_yaml(path)
    for name, f in formats.items():
        if not isinstance(f, dict) or not isinstance(f.get("template"), str):
            raise ConfigError(f"{path}: format {name!r}: needs a `template` string")
        unknown = _template_fields(f["template"]) - PLACEHOLDERS
        if unknown:
            raise ConfigError(f"{path}: format {name!r}: unknown placeholder(s) {sorted(unknown)}; "
                              f"allowed: {sorted(PLACEHOLDERS)}")
        if f.setdefault("kind", "text") not in ("text", "code"):
            raise ConfigError(f"{path}: format {name!r}: kind must be 'text' or 'code'")
        f.setdefault("weight", 1)
        f["domains"] = list(f.get("domains") or [])
    return formats


def load_audiences(path: Path | None = None) -> dict[str, dict[str, Any]]:
    path = path or DATA_DIR / "audiences.yaml"
    auds = _load_yaml(path)
    for name, a in auds.items():
        if not isinstance(a, dict) or "guidance" not in a:
            raise ConfigError(f"{path}: audience {name!r}: needs `guidance`")
        a.setdefault("weight", 1)
    return auds


def load_constraints(path: Path | None = None) -> dict[str, list]:
    path = path or DATA_DIR / "constraints.yaml"
    c = _load_yaml(path)
    need = ("words", "styles", "random_words", "code_constraints", "function_verbs", "function_nouns", "names")
    missing = [k for k in need if not c.get(k)]
    if missing:
        raise ConfigError(f"{path}: missing or empty list(s) {missing}")
    return c


def words_for_tokens(max_new_tokens: int) -> int:
    """The length to ask a teacher for (the prompt's "about N words") when it may write `max_new_tokens` tokens:
    a multiple of 10, at least 10."""
    return max(10, int(max_new_tokens * WORDS_PER_TOKEN) // 10 * 10)


def _weighted(rng: random.Random, table: dict[str, float]) -> str:
    names = sorted(table)
    return rng.choices(names, weights=[float(table[n]) for n in names], k=1)[0]


class PromptSampler:
    """Deterministic prompts: `sampler.sample(index)` depends only on (seed, index) and the data files.

    `formats` / `audiences` (name -> weight) restrict or reweight the built-in tables; a weight of 0 drops one.
    `max_words` caps the length a prompt asks for (`words_for_tokens` of the teacher's token budget), so that a
    passage the teacher writes as asked fits its budget.
    """

    def __init__(self, seed: int = 0, topics: list[str | Path] | None = None, formats: dict[str, float] | None = None,
                 audiences: dict[str, float] | None = None, max_words: int | None = None):
        self.seed = int(seed)
        self.max_words = max_words
        self.topics = load_topics(topics)
        self.formats = load_formats()
        self.audiences = load_audiences()
        self.constraints = load_constraints()
        self.format_weights = self._weights("format", self.formats, formats)
        self.audience_weights = self._weights("audience", self.audiences, audiences)
        self._by_domain: dict[str, list[Topic]] = {}
        for t in self.topics:
            self._by_domain.setdefault(t.domain, []).append(t)

    @staticmethod
    def _weights(what: str, table: dict[str, dict], override: dict[str, float] | None) -> dict[str, float]:
        if override:
            unknown = sorted(set(override) - set(table))
            if unknown:
                raise ConfigError(f"synth config: unknown {what}(s) {unknown}; known: {sorted(table)}")
            w = {k: float(v) for k, v in override.items() if float(v) > 0}
        else:
            w = {k: float(v["weight"]) for k, v in table.items() if float(v["weight"]) > 0}
        if not w:
            raise ConfigError(f"synth config: every {what} has weight 0")
        return w

    def _words(self, drawn: Any) -> Any:
        # drawn first, then capped: the rest of the prompt's draws stay the same whatever the budget
        return drawn if self.max_words is None else min(int(drawn), int(self.max_words))

    def sample(self, index: int) -> PromptSpec:
        rng = random.Random(f"{self.seed}:prompt:{index}")  # string seeds hash stably across runs
        fmt_name = _weighted(rng, self.format_weights)
        fmt = self.formats[fmt_name]
        pool = [t for d in fmt["domains"] for t in self._by_domain.get(d, [])] if fmt["domains"] else self.topics
        topic = rng.choice(pool or self.topics)
        audience = _weighted(rng, self.audience_weights)
        c = self.constraints
        style = rng.choice(c["styles"]).replace("{random_word}", rng.choice(c["random_words"]))
        values: dict[str, Any] = {
            "topic": topic.topic, "subdomain": topic.subdomain, "domain": topic.domain, "audience": audience,
            "guidance": self.audiences[audience]["guidance"], "words": self._words(rng.choice(c["words"])),
            "style": style,
            "function_name": f"{rng.choice(c['function_verbs'])}_{rng.choice(c['function_nouns'])}",
            "code_constraint": rng.choice(c["code_constraints"]),
            "names": " and ".join(rng.sample(c["names"], 2)),
        }
        used = _template_fields(fmt["template"])
        prompt = fmt["template"].format(**values)
        constraints = {k: values[k] for k in ("words", "style", "function_name", "code_constraint", "names") if k in used}
        return PromptSpec(prompt=prompt, topic=topic, audience=audience, format=fmt_name, kind=fmt["kind"],
                          constraints=constraints)
