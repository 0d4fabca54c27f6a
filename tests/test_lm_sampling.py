"""The one Sampling type and stop cut (phiforge.lm.sampling) and the request shape built on them (lm.base)."""

from __future__ import annotations

import dataclasses

import pytest

from phiforge.lm.base import GenRequest, generation_batches
from phiforge.lm.sampling import GREEDY, Sampling, cut_at_stop, find_stop


def test_cut_at_the_earliest_stop_string():
    assert cut_at_stop("a\n\nb###c", ["###", "\n\n"]) == "a"
    assert cut_at_stop("no stops here", ["###"]) == "no stops here"
    assert cut_at_stop("kept", []) == "kept"
    assert cut_at_stop("empty strings never match", [""]) == "empty strings never match"
    assert find_stop("ab##cd##", ["##"], start=3) == 6  # streaming looks only at the tail
    assert find_stop("abc", ["x"]) == -1


def test_sampling_is_one_hashable_type_with_the_old_positional_order():
    s = Sampling(0.8, seed=3)  # eval's old Sampling(temperature, top_p, top_k, seed)
    assert (s.temperature, s.seed, s.top_p, s.max_new_tokens, s.stop) == (0.8, 3, None, 256, ())
    assert Sampling(stop=["\n"]).stop == ("\n",)  # lists become tuples: a Sampling keys a dict
    assert {Sampling(stop=["a"]): 1}[Sampling(stop=("a",))] == 1
    assert GREEDY.temperature == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        GREEDY.temperature = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("field,value", [("max_new_tokens", -1), ("temperature", -0.1), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -1), ("repetition_penalty", 0.0)])
def test_validate_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Sampling(**{field: value}).validate()


def test_every_generator_takes_the_one_sampling_type():
    from phiforge.generate import GenerationConfig
    from phiforge.serve.engine import Request

    cfg = GenerationConfig(temperature=0.5, stop=["x"], eos_token_id=2)
    assert isinstance(cfg, Sampling) and cfg.max_new_tokens == 128 and cfg.stop == ("x",)
    assert Request([1, 2]).sampling.max_new_tokens == 16  # OpenAI's default for /completions
    assert GenRequest("ctx").sampling == GREEDY


def test_request_key_keeps_the_old_cache_shape():
    """Eval caches written before Sampling held max_new_tokens and stop still hit: the key has the old shape."""
    r = GenRequest("Q:", Sampling(0.8, seed=2, max_new_tokens=32, stop=("\n",)))
    assert r.key() == {"context": "Q:", "stop": ["\n"], "max_tokens": 32,
                       "sampling": {"temperature": 0.8, "top_p": None, "top_k": None, "seed": 2}}
    assert GenRequest("Q:", Sampling(repetition_penalty=1.3)).key()["sampling"]["repetition_penalty"] == 1.3


def test_generation_batches_group_equal_settings_longest_first():
    a, b = Sampling(max_new_tokens=8), Sampling(max_new_tokens=8, stop=("\n",))
    reqs = [GenRequest("xx", a), GenRequest("y", b), GenRequest("zzzz", a), GenRequest("w", a)]
    assert generation_batches(reqs, batch_size=2) == [[2, 0], [3], [1]]
