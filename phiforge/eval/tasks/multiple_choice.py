"""Multiple choice by log-likelihood: ARC-Easy/Challenge, PIQA, HellaSwag, WinoGrande, BoolQ, OpenBookQA, SIQA,
MMLU.

Every task turns its files into documents of one shape — template fields + `choices` + `gold` — and is scored
the lm-evaluation-harness way: request = (few-shot prefix + template.format(doc), " " + choice); acc = argmax
log-likelihood, acc_norm = argmax log-likelihood / len(choice). WinoGrande uses partial scoring instead: the
choices are the *contexts* (sentence up to the blank with each option filled in) and the shared continuation
(rest of the sentence) is scored after each (acc only).
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiforge.errors import DataError
from phiforge.eval.data import hf_dataset, load_docs, read_jsonl, read_lines, require
from phiforge.eval.metrics import macro_mean_stderr, mc_scores, mean_stderr
from phiforge.eval.tasks.base import Task, TaskResult

FEWSHOT_SEED = 1234


@dataclass
class MCTask(Task):
    template: str = ""  # str.format over the document's fields
    target_delimiter: str = " "
    fewshot_sep: str = "\n\n"
    partial: bool = False  # WinoGrande: choices are contexts, one shared continuation
    local_reader: Any = None  # Path -> docs
    hub_reader: Any = None  # () -> docs
    fewshot_reader: Any = None  # (data_dir) -> docs or None

    def load(self, data_dir=None, allow_hub=True):
        return load_docs(self.name, self.local_path, self.local_reader, hub=self.hub, read_hub=self.hub_reader,
                         data_dir=data_dir, allow_hub=allow_hub)

    # ---- prompts ---------------------------------------------------------------------------------------------
    def context(self, doc: dict) -> str:
        return self.template.format(**doc)

    def target_text(self, doc: dict) -> str:
        return doc["choices"][doc["gold"]]

    def fewshot_prefix(self, doc: dict, shots: list[dict]) -> str:
        return "".join(self.context(s) + self.target_delimiter + self.target_text(s) + self.fewshot_sep
                       for s in shots)

    def pick_shots(self, doc_index: int, k: int, pool: list[dict] | None) -> list[dict]:
        if k == 0:
            return []
        if not pool:
            raise DataError(f"task {self.name!r}: no few-shot pool in the data found ({self.fewshot_pool}); "
                            f"use --num-fewshot 0")
        rng = random.Random(FEWSHOT_SEED + doc_index)
        return rng.sample(pool, min(k, len(pool)))

    def requests(self, doc: dict, prefix: str) -> list[tuple[str, str]]:
        if self.partial:
            return [(prefix + c, self.target_delimiter + doc["continuation"]) for c in doc["contexts"]]
        ctx = prefix + self.context(doc)
        return [(ctx, self.target_delimiter + c) for c in doc["choices"]]

    def run(self, lm, docs, *, num_fewshot=None, log_samples=False, data_dir=None, **opts):
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        pool = self.fewshot_reader(data_dir) if (k and self.fewshot_reader) else None
        reqs: list[tuple[str, str]] = []
        spans = []
        for i, doc in enumerate(docs):
            prefix = self.fewshot_prefix(doc, self.pick_shots(i, k, pool))
            r = self.requests(doc, prefix)
            spans.append((len(reqs), len(reqs) + len(r)))
            reqs += r
        res = lm.loglikelihood(reqs) if reqs else []
        return self.score(docs, reqs, res, spans, log_samples)

    def score(self, docs, reqs, res, spans, log_samples) -> TaskResult:
        names = [m for m in self.metrics if m in ("acc", "acc_norm")]
        per: dict[str, list[float]] = {m: [] for m in names}
        samples = []
        for doc, (a, b) in zip(docs, spans):
            lls = [r[0] for r in res[a:b]]
            lens = doc["contexts"] if self.partial else doc["choices"]
            s = mc_scores(lls, lens, doc["gold"])
            for m in names:
                per[m].append(s[m])
            if log_samples:
                samples.append({"doc": doc, "requests": reqs[a:b], "loglikelihoods": lls,
                                "is_greedy": [r[1] for r in res[a:b]], "gold": doc["gold"], **s})
        notes = [self.notes] if self.notes else []
        return TaskResult({m: mean_stderr(v) for m, v in per.items()}, len(docs), notes, samples)


# ---- readers: local canonical formats and hub rows -> documents ---------------------------------------------
def _strip_prefix(s: str, prefix: str) -> str:
    return s[len(prefix):] if s.startswith(prefix) else s


def _arc_local(path: Path) -> list[dict]:
    out = []
    for n, d in enumerate(read_jsonl(path), 1):
        require(d, ("query", "choices", "gold"), f"{path}:{n}")
        out.append({"question": _strip_prefix(d["query"], "Question: "), "choices": d["choices"],
                    "gold": int(d["gold"])})
    return out


def _arc_hub(name: str):
    def read() -> list[dict]:
        return [{"question": r["question"], "choices": r["choices"]["text"],
                 "gold": r["choices"]["label"].index(r["answerKey"])}
                for r in hf_dataset("allenai/ai2_arc", name, "test")]
    return read


def _piqa_local(path: Path) -> list[dict]:
    labels_path = path.with_name("valid-labels.lst")
    if not labels_path.exists():
        raise DataError(f"{labels_path}: missing (PIQA labels, one 0/1 per line next to valid.jsonl)")
    rows = read_jsonl(path)
    labels = [x for x in read_lines(labels_path) if x.strip()]
    if len(labels) != len(rows):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(rows)} items in {path}")
    return [{"goal": r["goal"], "choices": [r["sol1"], r["sol2"]], "gold": int(lab)} for r, lab in zip(rows, labels)]


def _piqa_hub() -> list[dict]:
    return [{"goal": r["goal"], "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
            for r in hf_dataset("baber/piqa", None, "validation")]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: strip, ' [title]' -> '. ', drop [tags], collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_local(path: Path) -> list[dict]:
    out = []
    for n, d in enumerate(read_jsonl(path), 1):
        require(d, ("query", "endings", "label"), f"{path}:{n}")
        out.append({"query": hellaswag_preprocess(d["query"]),
                    "choices": [hellaswag_preprocess(e) for e in d["endings"]], "gold": int(d["label"])})
    return out


def _hellaswag_hub() -> list[dict]:
    return [{"query": hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
             "choices": [hellaswag_preprocess(e) for e in r["endings"]], "gold": int(r["label"])}
            for r in hf_dataset("Rowan/hellaswag", None, "validation")]


def _winogrande_local(path: Path) -> list[dict]:
    out = []
    for n, d in enumerate(read_jsonl(path), 1):
        require(d, ("context_options", "continuation", "gold"), f"{path}:{n}")
        out.append({"contexts": d["context_options"], "continuation": d["continuation"].strip(),
                    "gold": int(d["gold"])})
    return out


def _winogrande_hub() -> list[dict]:
    out = []
    for r in hf_dataset("allenai/winogrande", "winogrande_xl", "validation"):
        i = r["sentence"].index("_")
        out.append({"contexts": [r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]],
                    "continuation": r["sentence"][i + 1:].strip(), "gold": int(r["answer"]) - 1})
    return out


def _boolq_local(path: Path) -> list[dict]:
    out = []
    for n, d in enumerate(read_jsonl(path), 1):
        require(d, ("query", "gold"), f"{path}:{n}")
        passage, sep, question = _strip_prefix(d["query"], "Passage: ").rpartition("\nQuestion: ")
        if not sep:
            raise DataError(f"{path}:{n}: query has no '\\nQuestion: ' part")
        out.append({"passage": passage, "question": question, "choices": ["no", "yes"], "gold": int(d["gold"])})
    return out


def _boolq_hub() -> list[dict]:
    return [{"passage": r["passage"], "question": r["question"], "choices": ["no", "yes"], "gold": int(r["label"])}
            for r in hf_dataset("aps/super_glue", "boolq", "validation")]


def _obqa_local(path: Path) -> list[dict]:
    return [{"question": d["query"], "choices": d["choices"], "gold": int(d["gold"])} for d in read_jsonl(path)]


def _obqa_hub() -> list[dict]:
    return [{"question": r["question_stem"], "choices": r["choices"]["text"],
             "gold": r["choices"]["label"].index(r["answerKey"].lstrip())}
            for r in hf_dataset("allenai/openbookqa", "main", "test")]


_SIQA_RE = re.compile(r"^Context: (.*)\nQuestion: (.*)\nChoices:\n((?:[A-Z]\. .*\n)+)Answer:\s*$", re.S)


def _siqa_local(path: Path) -> list[dict]:
    """llm-foundry's lossy 2-option SIQA: the option texts are parsed back out of the A/B letter prompt."""
    out = []
    for n, d in enumerate(read_jsonl(path), 1):
        m = _SIQA_RE.match(d.get("query", ""))
        if not m:
            raise DataError(f"{path}:{n}: query is not 'Context: ..\\nQuestion: ..\\nChoices:\\nA. ..\\nAnswer:'")
        options = [line[3:] for line in m.group(3).strip("\n").split("\n")]
        out.append({"context": m.group(1), "question": m.group(2), "choices": options, "gold": int(d["gold"]),
                    "two_choice": True})
    return out


def _siqa_hub() -> list[dict]:
    return [{"context": r["context"], "question": r["question"], "choices": [r["answerA"], r["answerB"], r["answerC"]],
             "gold": int(r["label"]) - 1} for r in hf_dataset("allenai/social_i_qa", None, "validation")]


class SIQATask(MCTask):
    def run(self, lm, docs, **kw):
        result = super().run(lm, docs, **kw)
        if docs and docs[0].get("two_choice"):
            result.notes.append("SIQA from the local llm-foundry copy has only 2 of the 3 options per question "
                                "(random = 50%, not 33%): NOT comparable with lm-eval's 3-way social_iqa")
        return result


# ---- MMLU -------------------------------------------------------------------------------------------------------
MMLU_SUBJECTS = ["abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology", "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science", "high_school_european_history", "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine", "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions"]
LETTERS = "ABCD"


def _mmlu_csv(path: Path, subject: str) -> list[dict]:
    """Reads both the header-row/0-3 reformat and the original header-less letter-answer CSVs."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if rows and rows[0][:2] == ["question", "choice0"]:
        rows = rows[1:]
    out = []
    for n, r in enumerate(rows, 1):
        if len(r) != 6:
            raise DataError(f"{path}:{n}: expected 6 columns (question, 4 choices, answer), got {len(r)}")
        ans = r[5].strip()
        gold = LETTERS.index(ans) if ans in LETTERS else int(ans)
        out.append({"subject": subject, "question": r[0].strip(), "A": r[1], "B": r[2], "C": r[3], "D": r[4],
                    "choices": list(LETTERS), "gold": gold})
    return out


def _mmlu_local_split(root: Path, split: str) -> list[dict]:
    docs = []
    for s in MMLU_SUBJECTS:
        p = root / split / f"{s}_{split}.csv"
        if not p.exists():
            raise DataError(f"{p}: missing MMLU file (57 subjects expected under {root / split})")
        docs += _mmlu_csv(p, s)
    return docs


def _mmlu_hub_split(split: str) -> list[dict]:
    docs = []
    for r in hf_dataset("cais/mmlu", "all", split):
        docs.append({"subject": r["subject"], "question": r["question"].strip(),
                     **dict(zip(LETTERS, r["choices"])), "choices": list(LETTERS), "gold": int(r["answer"])})
    return docs


class MMLUTask(MCTask):
    """57 subjects, 5-shot from each subject's dev set (the first k dev items, in file order, as in the paper);
    metrics: micro average over all questions and macro average over subjects."""

    def load(self, data_dir=None, allow_hub=True):
        return load_docs(self.name, self.local_path, lambda p: _mmlu_local_split(p, "test"), hub=self.hub,
                         read_hub=lambda: _mmlu_hub_split("test"), data_dir=data_dir, allow_hub=allow_hub)

    def dev(self, data_dir=None) -> dict[str, list[dict]]:
        docs, _ = load_docs(self.name + " (dev)", self.local_path, lambda p: _mmlu_local_split(p, "dev"),
                            hub=self.hub, read_hub=lambda: _mmlu_hub_split("dev"), data_dir=data_dir)
        by: dict[str, list[dict]] = {}
        for d in docs:
            by.setdefault(d["subject"], []).append(d)
        return by

    def run(self, lm, docs, *, num_fewshot=None, log_samples=False, data_dir=None, **opts):
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        dev = self.dev(data_dir) if k else {}
        reqs, spans = [], []
        for doc in docs:
            subj = doc["subject"]
            head = f"The following are multiple choice questions (with answers) about {subj.replace('_', ' ')}.\n\n"
            prefix = head + self.fewshot_prefix(doc, dev.get(subj, [])[:k])
            r = self.requests(doc, prefix)
            spans.append((len(reqs), len(reqs) + len(r)))
            reqs += r
        res = lm.loglikelihood(reqs) if reqs else []
        result = self.score(docs, reqs, res, spans, log_samples)
        # Per-subject accuracy -> macro average (method in phiforge.eval.metrics).
        per_subject: dict[str, list[float]] = {}
        for doc, (a, b) in zip(docs, spans):
            per_subject.setdefault(doc["subject"], []).append(
                mc_scores([x[0] for x in res[a:b]], doc["choices"], doc["gold"])["acc"])
        parts = {s: mean_stderr(v) for s, v in per_subject.items()}
        result.metrics = {"acc": result.metrics["acc"], "acc_macro": macro_mean_stderr(list(parts.values()))}
        result.extra["subjects"] = {s: {"acc": m, "acc_stderr": se, "n": len(per_subject[s])}
                                    for s, (m, se) in parts.items()}
        return result


def _no_pool(_data_dir=None) -> None:
    return None


def multiple_choice_tasks() -> list[Task]:
    return [
        MCTask("arc_easy", "1.0", "multiple_choice", "Question: {question}\nAnswer: {choice}", ("acc", "acc_norm"),
               fewshot_pool="ARC train (hub only; not in the local files)", local_path="arc/arc_easy_test.jsonl",
               hub="allenai/ai2_arc:ARC-Easy", template="Question: {question}\nAnswer:",
               local_reader=_arc_local, hub_reader=_arc_hub("ARC-Easy"), fewshot_reader=_no_pool),
        MCTask("arc_challenge", "1.0", "multiple_choice", "Question: {question}\nAnswer: {choice}",
               ("acc", "acc_norm"), fewshot_pool="ARC train (hub only)", local_path="arc/arc_challenge_test.jsonl",
               hub="allenai/ai2_arc:ARC-Challenge", template="Question: {question}\nAnswer:",
               local_reader=_arc_local, hub_reader=_arc_hub("ARC-Challenge"), fewshot_reader=_no_pool),
        MCTask("piqa", "1.0", "multiple_choice", "Question: {goal}\nAnswer: {sol}", ("acc", "acc_norm"),
               fewshot_pool="none (train.jsonl not shipped)", local_path="piqa/valid.jsonl", hub="baber/piqa",
               template="Question: {goal}\nAnswer:", local_reader=_piqa_local, hub_reader=_piqa_hub,
               fewshot_reader=_no_pool),
        MCTask("hellaswag", "1.0", "multiple_choice", "{activity_label}: {ctx} {ending} (lm-eval preprocessing)",
               ("acc", "acc_norm"), fewshot_pool="none", local_path="hellaswag/hellaswag_val_preprocessed.jsonl.gz",
               hub="Rowan/hellaswag", template="{query}", local_reader=_hellaswag_local,
               hub_reader=_hellaswag_hub, fewshot_reader=_no_pool),
        MCTask("winogrande", "1.0", "multiple_choice",
               "partial scoring: {sentence up to _ with option} -> ' {rest of sentence}'", ("acc",),
               fewshot_pool="none", local_path="winogrande/winogrande_dev.jsonl", hub="allenai/winogrande:xl",
               partial=True, local_reader=_winogrande_local, hub_reader=_winogrande_hub, fewshot_reader=_no_pool),
        MCTask("boolq", "2.0", "multiple_choice", "{passage}\nQuestion: {question}?\nAnswer: no|yes", ("acc",),
               fewshot_pool="none", local_path="boolq/boolq_dev.jsonl", hub="aps/super_glue:boolq",
               template="{passage}\nQuestion: {question}?\nAnswer:", local_reader=_boolq_local,
               hub_reader=_boolq_hub, fewshot_reader=_no_pool),
        MCTask("openbookqa", "1.0", "multiple_choice", "{question_stem} {choice}", ("acc", "acc_norm"),
               fewshot_pool="none", local_path="openbookqa/openbookqa_test.jsonl", hub="allenai/openbookqa:main",
               template="{question}", local_reader=_obqa_local, hub_reader=_obqa_hub, fewshot_reader=_no_pool),
        SIQATask("siqa", "1.0", "multiple_choice", "Q: {context} {question}\nA: {answer}", ("acc", "acc_norm"),
                 fewshot_pool="none", local_path="siqa/siqa_dev_2choice.jsonl", hub="allenai/social_i_qa",
                 template="Q: {context} {question}\nA:", local_reader=_siqa_local, hub_reader=_siqa_hub,
                 fewshot_reader=_no_pool),
        MMLUTask("mmlu", "1.0", "multiple_choice",
                 "The following are multiple choice questions (with answers) about {subject}.\n\n"
                 "[5 dev shots]{question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer: {letter}", ("acc", "acc_macro"),
                 num_fewshot=5, fewshot_pool="dev split, first k per subject", local_path="mmlu",
                 hub="cais/mmlu:all", template="{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:"),
    ]
