"""Config reading: YAML with key lines, a mapping onto a typed dataclass (coercion, unknown keys and bad values
named with FILE:LINE), and the run config, every section of which is validated when it is loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from phiforge.configio import Source, coerce, load_yaml, read_dataclass
from phiforge.errors import ConfigError


@dataclass
class Inner:
    size: int = 1
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    lr: float = 1e-3
    steps: int | None = None
    flag: bool = False
    path: Path = Path(".")
    betas: tuple[float, float] = (0.9, 0.95)
    weights: dict[str, float] = field(default_factory=dict)
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr must be > 0")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_load_yaml_keeps_the_line_of_every_key(tmp_path):
    src = load_yaml(write(tmp_path, "a: 1\nb:\n  c: 2\n  d:\n    - x\n    - y\n"))
    assert src.data == {"a": 1, "b": {"c": 2, "d": ["x", "y"]}}
    assert src.lines[("a",)] == 1 and src.lines[("b", "c")] == 3 and src.lines[("b", "d", 1)] == 6
    assert src.at(("b", "d", 1)) == f"{src.name}:6" and src.at(("b", "nope")) == f"{src.name}:2"
    assert Source("defaults").at(("b",)) == "defaults"
    with pytest.raises(ConfigError, match=r"c\.yaml:2: invalid YAML"):
        load_yaml(write(tmp_path, "a: [1\nb: 2\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(write(tmp_path, "- 1\n"))
    assert load_yaml(write(tmp_path, "")).data == {}


def test_values_are_coerced_to_the_field_types(tmp_path):
    src = load_yaml(write(tmp_path, "lr: '3e-4'\nsteps: 10.0\nflag: true\npath: out/x\nbetas: [0.9, 1]\n"
                                    "weights: {a: 1, b: 2.5}\nmode: b\ninner:\n  size: '4'\n  names: [x, 7]\n"))
    o = read_dataclass(Outer, src.data, src)
    assert o == Outer(lr=3e-4, steps=10, flag=True, path=Path("out/x"), betas=(0.9, 1.0), weights={"a": 1.0, "b": 2.5},
                      mode="b", inner=Inner(size=4, names=["x", "7"]))
    assert isinstance(o.steps, int) and isinstance(o.weights["a"], float)
    assert read_dataclass(Outer, {"steps": None}, Source("s")).steps is None
    assert coerce(3, float, Source("s"), ("x",)) == 3.0 and isinstance(coerce(3, float, Source("s"), ("x",)), float)


@pytest.mark.parametrize("text,match", [
    ("lr: 1\nlrr: 2\n", r"c\.yaml:2: unknown key\(s\) 'lrr' \(known: lr, steps, flag"),
    ("inner:\n  size: 2\n  sise: 3\n", r"c\.yaml:3: inner: unknown key\(s\) 'sise' \(known: size, names\)"),
    ("lr: 1\nsteps: abc\n", r"c\.yaml:2: steps should be int, got 'abc'"),
    ("flag: 'yes'\n", r"c\.yaml:1: flag should be bool, got 'yes'"),
    ("inner:\n  names: [a, [b]]\n", r"c\.yaml:2: inner\.names\.1 should be str, got \['b'\]"),
    ("betas: [0.9]\n", r"c\.yaml:1: betas should be tuple\[float, float\], got \[0\.9\]"),
    ("mode: c\n", r"c\.yaml:1: mode should be one of 'a', 'b', got 'c'"),
    ("lr: null\n", r"c\.yaml:1: lr may not be null"),
    ("inner: 3\n", r"c\.yaml:1: inner should be a mapping of keys, got int"),
    ("flag: true\nlr: -1\n", r"c\.yaml: lr must be > 0"),  # the dataclass's own check
])
def test_errors_name_file_line_and_key(tmp_path, text, match):
    src = load_yaml(write(tmp_path, text))
    with pytest.raises(ConfigError, match=match):
        read_dataclass(Outer, src.data, src)


def test_missing_required_keys_are_named():
    @dataclass
    class Needs:
        a: int
        b: int = 0

    with pytest.raises(ConfigError, match="sec: missing key\\(s\\) 'a'"):
        read_dataclass(Needs, {"b": 1}, Source("cfg"), ("sec",))


def test_merged_overrides_lose_their_file_lines(tmp_path):
    src = load_yaml(write(tmp_path, "train:\n  lr: 1\n  steps: 2\nseed: 3\n"))
    m = src.merged({"train": {"lr": "x"}, "seed": 4}, "overrides")
    assert m.data == {"train": {"lr": "x", "steps": 2}, "seed": 4}
    assert ("train", "lr") not in m.lines and ("seed",) not in m.lines
    assert m.lines[("train", "steps")] == 3 and m.lines[("train",)] == 1
    assert src.data["train"]["lr"] == 1  # the original is untouched
    assert m.at(("train", "steps")) == f"{src.name}:3" and m.at(("train", "lr")) == f"{src.name}:1"
    assert m.at(("seed",)) == f"{src.name} + overrides"


# ---- the run config: every section typed and validated at load ------------------------------------------------
def test_run_config_typo_in_train_fails_at_load_naming_file_and_line(tmp_path):
    from phiforge.run import load_run_config

    p = write(tmp_path, "seed: 1\ntrain:\n  max_steps: 3\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:4: train: unknown key\(s\) 'lrr'"):
        load_run_config(p)


@pytest.mark.parametrize("text,match", [
    ("corpus:\n  max_file: 3\n", r"c\.yaml:2: corpus: unknown key\(s\) 'max_file'"),
    ("eval:\n  humaneval_limit: many\n", r"c\.yaml:2: eval\.humaneval_limit should be int, got 'many'"),
    ("tokenizer:\n  vocab_size: [1]\n", r"c\.yaml:2: tokenizer\.vocab_size should be int"),
    ("synth:\n  mix: {poems: 1}\n", r"c\.yaml:1: synth: mix: unknown source\(s\) \['poems'\]"),
    ("textbooks:\n  n: 2\n  sampling: {temprature: 1}\n", r"c\.yaml:1: textbooks: .*temprature"),
    ("curate:\n  steps:\n    - type: python\n      max_doc: 1\n", r"c\.yaml:1: curate: steps\[0\]: unknown key 'max_doc'"),
    ("train:\n  schedule: cosin\n", r"c\.yaml:1: train: .*schedule 'cosin'"),
    ("ablate: [raw]\n", r"c\.yaml:1: ablate is a mapping now"),
    ("ablate:\n  seeds: 0\n", r"c\.yaml:2: ablate\.seeds must be at least 1"),
    ("ablate:\n  enabeld: true\n", r"c\.yaml:2: ablate: unknown key\(s\) 'enabeld'"),
    ("trian:\n  max_steps: 3\n", r"c\.yaml:1: unknown run config key\(s\) 'trian'"),
    ("seed: 1\ntrain:\n", r"c\.yaml:2: train should be a mapping of keys, got NoneType"),
])
def test_run_config_sections_are_all_validated_at_load(tmp_path, text, match):
    from phiforge.run import load_run_config

    with pytest.raises(ConfigError, match=match):
        load_run_config(write(tmp_path, text))


def test_run_config_sections_are_typed_and_merge_as_before(tmp_path):
    from phiforge.data.curate.pipeline import CurateConfig
    from phiforge.data.synth.pipeline import SynthConfig
    from phiforge.run import FAST_OVERRIDES, default_run_config, load_run_config, plan
    from phiforge.train.config import TrainConfig

    p = write(tmp_path, "seed: 7\nsynth:\n  mix: {math_problems: 1.0}\ntrain:\n  lr: '1e-3'\n  seed: 3\n"
                        "textbooks:\n  n: 0\n")
    cfg = load_run_config(p, fast=True, overrides={"out": str(tmp_path / "r")})
    assert isinstance(cfg.curate, CurateConfig) and isinstance(cfg.synth, SynthConfig)
    assert isinstance(cfg.train, TrainConfig) and cfg.train.lr == 1e-3
    # sections merge key by key over the defaults and --fast; the run's seed unless a section sets its own
    assert cfg.synth.mix == {"python_exercises": 0.7, "math_problems": 1.0} and cfg.synth.seed == 7
    assert cfg.train.seed == 3 and cfg.train.max_steps == FAST_OVERRIDES["train"]["max_steps"]
    assert cfg.textbooks.n == 0 and cfg.textbooks.mix == {"textbooks": 1.0}  # n = 0: skipped, not an error
    assert cfg.corpus.max_files == 150 and cfg.out == str(tmp_path / "r")
    # stages are keyed by the sections as written, so configs that read the same keep their stage hashes
    stages = {s.name: s.config for s in plan(cfg)}
    assert stages["train"] == {"train": cfg.raw["train"], "seed": 7} and stages["curated"] == cfg.raw["curate"]
    assert cfg.raw["train"] == {**default_run_config()["train"], **FAST_OVERRIDES["train"], "lr": "1e-3",
                                "seed": 3}
    default = load_run_config()
    assert dataclasses.asdict(default.eval) == default.raw["eval"] and default.ablate.enabled is False
