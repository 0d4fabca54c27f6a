"""Reading config files: YAML with the line of every key, and a mapping onto a typed dataclass.

    src = load_yaml("run.yaml")                                   # .data, and .lines: key path -> line
    train = read_dataclass(TrainConfig, src.data["train"], src, ("train",))

`read_dataclass` checks keys against the dataclass's fields and coerces each value to its field's type hint
(bool, int, float, str, Path, list[...], tuple[...], dict[..., ...], Optional / unions, Literal, nested
dataclasses); every error is a ConfigError that starts with FILE:LINE (the line of the offending key when the
value came from a file) and names the key, e.g. `run.yaml:12: train: unknown key(s) 'lrr' (known: ...)`.
No third-party import at module level: the CLI reads configs before it builds anything.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from phiforge.errors import ConfigError

T = TypeVar("T")
KeyPath = tuple[Any, ...]  # mapping keys and list indices from the document root


@dataclass
class Source:
    """Config data and where it came from: a name (a file, or e.g. "run config") and, for a file, the line
    of every key and list item by its key path."""

    name: str
    data: Any = None
    lines: dict[KeyPath, int] = field(default_factory=dict)
    merged_in: str = ""  # what was merged over the file (e.g. "overrides"): named where a value has no line

    def at(self, path: KeyPath = ()) -> str:
        """'FILE:LINE' of the innermost key on `path` whose line is known, else the source's name."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return f"{self.name}:{self.lines[path[:n]]}"
        return f"{self.name} + {self.merged_in}" if self.merged_in else self.name

    def merged(self, over: Mapping[str, Any], what: str = "") -> Source:
        """This data with `over` (`what`: e.g. "overrides") merged in: mappings merge key by key, anything else
        replaces; keys that `over` sets lose their file lines, since their values no longer come from the file."""
        lines = {p: n for p, n in self.lines.items() if not _sets(over, p)}
        return Source(self.name, deep_merge(self.data, over), lines, what or self.merged_in)


def deep_merge(base: Any, over: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `over` merged in: nested mappings merge, any other value replaces."""
    out = copy.deepcopy(dict(base or {}))
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) \
            else copy.deepcopy(v)
    return out


def _sets(over: Any, path: KeyPath) -> bool:
    """Whether merging `over` replaces the value at `path` or at one of its parents."""
    for key in path:
        if not isinstance(over, Mapping) or key not in over:
            return False
        over = over[key]
        if not isinstance(over, Mapping):
            return True
    return False


# ---- YAML ---------------------------------------------------------------------------------------------------
def load_yaml(path: str | Path, *, what: str = "settings", mapping: bool = True) -> Source:
    """Parse a YAML file, keeping the line of every key; a missing file, invalid YAML (with file:line) or, when
    `mapping`, a document that is not a mapping is a ConfigError. An empty file is an empty mapping."""
    import yaml

    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except OSError as e:  # a directory, no permission, ...
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (byte {e.start})") from None
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters first: a control character is a YAMLError
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    if mapping:
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of {what}")
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _collect_lines(node, (), lines)
    return Source(str(p), data, lines)


def _collect_lines(node: Any, path: KeyPath, out: dict[KeyPath, int], seen: set[int] | None = None) -> None:
    import yaml

    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: its lines are those of the anchor (and nested aliases must not blow up)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = path + (k.value,)
            out.setdefault(key, k.start_mark.line + 1)
            _collect_lines(v, key, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.setdefault(path + (i,), v.start_mark.line + 1)
            _collect_lines(v, path + (i,), out, seen)


# ---- dataclasses --------------------------------------------------------------------------------------------
def _label(path: KeyPath) -> str:
    return ".".join(str(k) for k in path)


def check_keys(data: Mapping[str, Any], known: list[str], src: Source, path: KeyPath = (), what: str = "") -> None:
    """A ConfigError at the first unknown key's line naming every key of `data` not in `known`."""
    unknown = [k for k in data if k not in known]
    if unknown:
        head = f"{_label(path)}: unknown key(s)" if path else f"unknown {what + ' ' if what else ''}key(s)"
        raise ConfigError(f"{src.at(path + (unknown[0],))}: {head} {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(known)})")


def read_dataclass(cls: type[T], data: Any, src: Source, path: KeyPath = (), what: str = "") -> T:
    """`data` (a mapping, e.g. `src.data` or a section of it at `path`) as a `cls`: unknown keys, values of the
    wrong type and the dataclass's own validation errors are ConfigErrors naming FILE:LINE and the key.
    `what` names the config in messages about a top-level mapping ("unknown train config key(s) ...")."""
    if not isinstance(data, Mapping):
        shown = _label(path) or what or "config"
        raise ConfigError(f"{src.at(path)}: {shown} should be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    check_keys(data, fields, src, path, what)
    values = {k: coerce(v, hints[k], src, path + (k,)) for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{src.at(path)}: {_label(path) + ': ' if path else ''}missing key(s) "
                          f"{', '.join(map(repr, missing))}")
    try:
        return cls(**values)
    except ConfigError as e:  # the dataclass's own checks (__post_init__), at the line of its section
        raise ConfigError(f"{src.at(path)}: {_label(path) + ': ' if path else ''}{e}") from None


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else \
        str(hint).replace("typing.", "").replace("NoneType", "None")


def coerce(value: Any, hint: Any, src: Source, path: KeyPath) -> Any:
    """`value` as type `hint`: ints where floats are expected, numeric strings ('1e-3') for numbers, numbers
    for strings; anything else that does not fit is a ConfigError '<where>: <key> should be <type>, got ...'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def wrong() -> ConfigError:
        return ConfigError(f"{src.at(path)}: {_label(path)} should be {_type_name(hint)}, got {value!r}")

    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, src, path)
            except ConfigError:
                if len(args) == 2 and type(None) in args:  # Optional[X]: X's own message is the clearer one
                    raise
        raise wrong()
    if value is None:
        raise ConfigError(f"{src.at(path)}: {_label(path)} may not be null")
    if dataclasses.is_dataclass(hint):
        return read_dataclass(hint, value, src, path)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{src.at(path)}: {_label(path)} should be one of "
                              f"{', '.join(map(repr, args))}, got {value!r}")
        return value
    try:
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(float(value)) if float(value).is_integer() else int(value)
            if not isinstance(value, int):
                raise TypeError
            return value
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if hint is Path:
            if not isinstance(value, (str, Path)):
                raise TypeError
            return Path(value)
    except (TypeError, ValueError):
        raise wrong() from None
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise wrong()
        item = args[0] if args else Any
        return [coerce(v, item, src, path + (i,)) for i, v in enumerate(value)]
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong()
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(coerce(v, item, src, path + (i,)) for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong()
        return tuple(coerce(v, a, src, path + (i,)) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        item = args[1] if args else Any
        return {k: coerce(v, item, src, path + (k,)) for k, v in value.items()}
    if isinstance(hint, type) and not isinstance(value, hint):
        raise wrong()
    return value
