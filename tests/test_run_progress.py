"""`phiforge run`'s progress off a terminal: plain timestamped lines, throttled, with the final state; a heartbeat
whenever a long step prints nothing; training's and evaluation's steps all show up in a log."""

from __future__ import annotations

import json
import math
import random
import re
import time

import pytest

import phiforge.progress as P

STAMP = re.compile(r"\d\d:\d\d:\d\d ")


@pytest.fixture
def lines_mode(monkeypatch):
    """Lines mode without the heartbeat thread (tests that want it start it), on a fresh state."""
    monkeypatch.delenv("PHIFORGE_PROGRESS", raising=False)
    monkeypatch.setattr(P, "LINE_INTERVAL", 0.2)
    monkeypatch.setattr(P, "_QUIET", False)  # an earlier in-process `phiforge --quiet ...` call may have set it
    monkeypatch.setattr(P, "_last_line", 0.0)
    monkeypatch.setattr(P, "_bars", [])
    monkeypatch.setattr(P, "_working", [])
    P.set_lines(True, heartbeat=False)
    yield
    P.set_lines(False)


@pytest.fixture
def clock(monkeypatch):
    """The throttle's clock, advanced by hand: the tests never depend on the machine's speed."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    return now


def test_bars_become_throttled_timestamped_lines_off_a_terminal(lines_mode, clock, capsys):
    bar = P.progress(total=20, desc="train", unit="step")
    for i in range(20):
        clock[0] += 0.1  # a 0.1 s step
        bar.update(1)
        bar.set_postfix_str(f"loss {i}")  # a refresh every step, as training does
    bar.close()
    err = capsys.readouterr().err.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d train: ", line) for line in err), err
    # 2 s of steps at one line per 0.2 s: a line every other step (not 20 or more), plus the final state
    assert 9 <= len(err) <= 12, err
    assert "20/20" in err[-1] and "loss 19" in err[-1]
    assert len(set(err[-2:])) == 2  # the final state is not printed twice


def test_without_lines_mode_nothing_is_printed_off_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("PHIFORGE_PROGRESS", raising=False)
    for _ in P.progress(range(5), desc="quiet"):
        pass
    assert capsys.readouterr().err == ""
    assert not P.beat()  # no heartbeat either


def test_heartbeat_repeats_a_bar_that_does_not_move(lines_mode, clock, capsys):
    bar = P.progress(total=1, desc="edu+decontaminate", unit="shard")  # one shard that takes minutes
    capsys.readouterr()
    clock[0] += 0.1
    assert not P.beat()  # the log spoke 0.1 s ago
    clock[0] += 0.15
    assert P.beat()
    assert not P.beat()  # just printed
    clock[0] += 0.25
    assert P.beat()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(re.match(r"\d\d:\d\d:\d\d edu\+decontaminate:\s+0%.*0/1", e) for e in err), err
    bar.update(1)
    bar.close()
    capsys.readouterr()
    clock[0] += 1
    assert not P.beat()  # nothing open, nothing working: nothing to say


def test_heartbeat_names_a_working_block_without_a_bar(lines_mode, clock, capsys):
    with P.working("textbooks: loading the teacher"):
        clock[0] += 75
        assert P.beat()
        with P.working("inner step"):
            clock[0] += 0.1
            assert not P.beat()
            clock[0] += 0.9
            assert P.beat()
        clock[0] += 0.3
        assert P.beat()
    clock[0] += 1
    assert not P.beat()
    err = capsys.readouterr().err.splitlines()
    assert [STAMP.sub("", e, count=1) for e in err] == [
        "textbooks: loading the teacher: working, 1:15 elapsed", "inner step: working, 0:01 elapsed",
        "textbooks: loading the teacher: working, 1:16 elapsed"], err
    assert all(STAMP.match(e) for e in err)


def test_the_heartbeat_thread_speaks_for_a_silent_block(monkeypatch, capsys):
    monkeypatch.delenv("PHIFORGE_PROGRESS", raising=False)
    monkeypatch.setattr(P, "LINE_INTERVAL", 0.05)
    monkeypatch.setattr(P, "_QUIET", False)
    monkeypatch.setattr(P, "_working", [])
    monkeypatch.setattr(P, "_bars", [])
    P.set_lines(True)
    try:
        with P.working("silent step"):
            deadline = time.monotonic() + 30  # a generous bound for a busy machine; it ends at the first line
            while "silent step: working" not in capsys.readouterr().err and time.monotonic() < deadline:
                time.sleep(0.02)
            assert time.monotonic() < deadline
    finally:
        P.set_lines(False)


WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "def", "foo", "return", "x", "print", "hello", "world",
         "python", "code", "loop", "list"]


def test_training_prints_timestamped_step_lines_into_a_log(lines_mode, tmp_path, monkeypatch, capsys):
    from phiforge.data.pack import pack_corpus
    from phiforge.train import train
    from phiforge.train.config import from_dict

    monkeypatch.setattr(P, "LINE_INTERVAL", 0.0)  # every refresh becomes a line: no dependence on speed
    rng = random.Random(0)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n"
                           for _ in range(60)))
    pack_corpus([src], tmp_path / "tok", train_vocab=300, val_fraction=0.1, workers=1)
    capsys.readouterr()
    train(from_dict(dict(model="tiny", model_overrides={"hidden_size": 32, "intermediate_size": 64,
                                                          "num_hidden_layers": 2, "num_attention_heads": 2,
                                                          "max_position_embeddings": 64},
                         data=str(tmp_path / "tok"), out=str(tmp_path / "run"), seq_len=32, micro_batch=4,
                         max_steps=5, warmup=1, eval_every=0, save_every=5, threads=1)))
    err = [e for e in capsys.readouterr().err.splitlines() if "train:" in e]
    assert err and all(STAMP.match(e) for e in err), err
    steps = [int(m.group(1)) for e in err if (m := re.search(r"(\d)/5", e))]
    assert steps[-1] == 5 and len(set(steps)) >= 3  # a line as the steps go, not one at the end
    assert "loss" in err[-1] and "tok/s" in err[-1]


class _StubLM:
    """Answers at once; reports each result as it comes (as the real backends do)."""

    def generate_until(self, reqs, on_result=None):
        out = []
        for i in range(len(reqs)):
            out.append("    return None\n")
            if on_result:
                on_result(i, out[-1])
        return out

    def loglikelihood(self, pairs, on_result=None):
        out = []
        for i, (_, x) in enumerate(pairs):
            out.append((-len(x.encode()) * math.log(2), False))
            if on_result:
                on_result(i, out[-1])
        return out

    def loglikelihood_rolling(self, texts, on_result=None):
        return [-len(t.encode()) * math.log(2) for t in texts]


def test_evaluation_steps_print_lines_into_a_log(lines_mode, monkeypatch, capsys):
    from phiforge.eval.recipe import _pass_at_1, heldout_exercises, neutral_bits_per_byte

    monkeypatch.setattr(P, "LINE_INTERVAL", 0.0)
    lm = _StubLM()
    res = _pass_at_1(lm, heldout_exercises(2, 0, set()), 16, "held-out exercises")
    assert res["n"] == 2
    data: dict[str, str] = {}
    neutral_bits_per_byte(lm, 2, 0, mbpp_limit=2, data=data)
    err = capsys.readouterr().err.splitlines()
    assert err and all(STAMP.match(e) for e in err), err
    for step in ("held-out exercises: generate: 100%", "held-out exercises: run tests: 100%",
                 "bits per byte: HumanEval: 100%"):
        assert any(step in e for e in err), (step, err)
    if not data["mbpp_solutions"].startswith("absent"):
        assert any("bits per byte: MBPP: 100%" in e for e in err)
