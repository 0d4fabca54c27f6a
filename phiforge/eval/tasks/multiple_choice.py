"""Multiple choice by log-likelihood: ARC-Easy/Challenge, PIQA, HellaSwag, WinoGrande, BoolQ, OpenBookQA, SIQA,
MMLU.

Every task turns its data (the rows of lm-eval's hub split, or its release file) into documents of one shape —
template fields + `choices` + `gold`, exactly lm-eval's doc_to_text/doc_to_choice/doc_to_target — and is scored
the lm-evaluation-harness way: request = (few-shot prefix + template.format(doc), " " + choice); acc = argmax
log-likelihood, acc_norm = argmax log-likelihood / len(choice). WinoGrande uses partial scoring instead: the
choices are the *contexts* (sentence up to the blank with each option filled in) and the shared continuation
(rest of the sentence) is scored after each (acc only).
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from phiforge.errors import DataError
from phiforge.eval.data import HubSplit, load_docs, read_jsonl, read_lines, require
from phiforge.eval.metrics import macro_mean_stderr, mc_scores, mean_stderr
from phiforge.eval.tasks.base import (
    MCItem,
    Task,
    TaskData,
    TaskResult,
    check_subjects,
    limit_per_subtask,
    subtask_data,
)

FEWSHOT_SEED = 1234


@dataclass
class MCTask(Task):
    template: str = ""  # str.format over the document's fields
    target_delimiter: str = " "
    fewshot_sep: str = "\n\n"
    partial: bool = False  # WinoGrande: choices are contexts, one shared continuation
    split: HubSplit | None = None  # the hub split lm-eval's task evaluates
    from_hub: Any = None  # hub row -> document
    local_reader: Any = None  # release file (local_path) -> documents
    mc_question: str = "{question}"  # str.format over the document: the question of its promptbase view

    def hub_splits(self, subjects=None):
        return [self.split] if self.split else []

    def fetch(self, data_dir=None, allow_hub=True, subjects=None):
        docs, src = load_docs(self.name, self.split, self.from_hub, data_dir, allow_hub=allow_hub,
                              release=self.local_path, read_release=self.local_reader)
        return TaskData(docs, [src])

    def mc_item(self, doc: dict, index: int) -> MCItem:
        uid = f"{self.name}:{index}"
        if self.partial:  # WinoGrande: the options are what fills the blank, the question is the sentence
            a, b = doc["contexts"]
            head = _common_word_prefix(a, b)
            sentence = f"{head}_ {doc['continuation']}".strip()
            return MCItem(uid, f"Fill in the blank: {sentence}", (a[len(head):], b[len(head):]), int(doc["gold"]))
        return MCItem(uid, self.mc_question.format(**doc), tuple(doc["choices"]), int(doc["gold"]))

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

    def run(self, lm, docs, *, num_fewshot=None, log_samples=False, data_dir=None, pool=None, **opts):
        k = self.num_fewshot if num_fewshot is None else num_fewshot
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


def _common_word_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    cut = a.rfind(" ", 0, n + 1)  # back off to a word boundary so an option keeps its first letters
    return a[: cut + 1] if cut >= 0 else ""


# ---- documents: hub rows (lm-eval's fields) and the release files -> one shape per task -----------------------
def _strip_prefix(s: str, prefix: str) -> str:
    return s[len(prefix):] if s.startswith(prefix) else s


def _arc_local(path: Path) -> list[dict]:
    out = []
    for n, d in enumerate(read_jsonl(path), 1):
        require(d, ("query", "choices", "gold"), f"{path}:{n}")
        out.append({"question": _strip_prefix(d["query"], "Question: "), "choices": d["choices"],
                    "gold": int(d["gold"])})
    return out


def _arc_hub(r: dict) -> dict:
    return {"question": r["question"], "choices": r["choices"]["text"],
            "gold": r["choices"]["label"].index(r["answerKey"])}


def _piqa_local(path: Path) -> list[dict]:
    labels_path = path.with_name("valid-labels.lst")
    if not labels_path.exists():
        raise DataError(f"{labels_path}: missing (PIQA labels, one 0/1 per line next to valid.jsonl)")
    rows = read_jsonl(path)
    labels = [x for x in read_lines(labels_path) if x.strip()]
    if len(labels) != len(rows):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(rows)} items in {path}")
    return [{"goal": r["goal"], "choices": [r["sol1"], r["sol2"]], "gold": int(lab)} for r, lab in zip(rows, labels)]


def _piqa_hub(r: dict) -> dict:
    return {"goal": r["goal"], "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}


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


def _hellaswag_hub(r: dict) -> dict:
    return {"query": hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
            "choices": [hellaswag_preprocess(e) for e in r["endings"]], "gold": int(r["label"])}


def _winogrande_local(path: Path) -> list[dict]:
    out = []
    for n, d in enumerate(read_jsonl(path), 1):
        require(d, ("context_options", "continuation", "gold"), f"{path}:{n}")
        out.append({"contexts": d["context_options"], "continuation": d["continuation"].strip(),
                    "gold": int(d["gold"])})
    return out


def _winogrande_hub(r: dict) -> dict:
    i = r["sentence"].index("_")
    return {"contexts": [r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]],
            "continuation": r["sentence"][i + 1:].strip(), "gold": int(r["answer"]) - 1}


def _boolq_local(path: Path) -> list[dict]:
    """llm-foundry's BoolQ: 'Passage: ..\nQuestion: ..?'. Its questions end in '?', the hub's (and so lm-eval's
    documents) do not, and the template adds one: the '?' is dropped here so the prompt is lm-eval's."""
    out = []
    for n, d in enumerate(read_jsonl(path), 1):
        require(d, ("query", "gold"), f"{path}:{n}")
        passage, sep, question = _strip_prefix(d["query"], "Passage: ").rpartition("\nQuestion: ")
        if not sep:
            raise DataError(f"{path}:{n}: query has no '\\nQuestion: ' part")
        out.append({"passage": passage, "question": question.removesuffix("?"), "choices": ["no", "yes"],
                    "gold": int(d["gold"])})
    return out


def _boolq_hub(r: dict) -> dict:
    return {"passage": r["passage"], "question": r["question"], "choices": ["no", "yes"], "gold": int(r["label"])}


def _obqa_local(path: Path) -> list[dict]:
    return [{"question": d["query"], "choices": d["choices"], "gold": int(d["gold"])} for d in read_jsonl(path)]


def _obqa_hub(r: dict) -> dict:
    return {"question": r["question_stem"], "choices": r["choices"]["text"],
            "gold": r["choices"]["label"].index(r["answerKey"].lstrip())}


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


def _siqa_hub(r: dict) -> dict:
    return {"context": r["context"], "question": r["question"], "choices": [r["answerA"], r["answerB"], r["answerC"]],
            "gold": int(r["label"]) - 1}


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


def _mmlu_hub(subject: str):
    def convert(r: dict) -> dict:
        return {"subject": subject, "question": r["question"].strip(), **dict(zip(LETTERS, r["choices"], strict=True)),
                "choices": list(LETTERS), "gold": int(r["answer"])}
    return convert


class MMLUTask(MCTask):
    """57 subjects, 5-shot from each subject's dev set (the first k dev items, in file order, as in the paper);
    metrics: micro average over all questions and macro average over subjects."""

    def subjects(self):
        return list(MMLU_SUBJECTS)

    def hub_splits(self, subjects=None):
        return [HubSplit("cais/mmlu", s, split) for s in check_subjects(self, subjects) for split in ("test", "dev")]

    def fetch(self, data_dir=None, allow_hub=True, subjects=None):
        def part(s: str):
            test, src = load_docs(self.name, HubSplit("cais/mmlu", s, "test"), _mmlu_hub(s), data_dir,
                                  allow_hub=allow_hub, release=f"mmlu/test/{s}_test.csv",
                                  read_release=lambda p: _mmlu_csv(p, s))
            dev, dsrc = load_docs(self.name, HubSplit("cais/mmlu", s, "dev"), _mmlu_hub(s), data_dir,
                                  allow_hub=allow_hub, release=f"mmlu/dev/{s}_dev.csv",
                                  read_release=lambda p: _mmlu_csv(p, s))
            return test, [src, dsrc], dev

        return subtask_data(self, check_subjects(self, subjects), part, subjects)

    def select(self, docs, limit):
        return limit_per_subtask(docs, limit, "subject")  # --limit N: N questions of every subject

    def mc_item(self, doc, index):
        return MCItem(f"{self.name}:{index}", doc["question"], tuple(doc[x] for x in LETTERS), int(doc["gold"]),
                      doc["subject"])

    def mc_pool(self, data_dir=None):
        return [replace(self.mc_item(d, j), uid=f"mmlu-dev:{s}:{j}") for s, ds in self.dev(data_dir).items()
                for j, d in enumerate(ds)]

    def dev(self, data_dir=None, allow_hub=True) -> dict[str, list[dict]]:
        """Each subject's dev split (its few-shot pool)."""
        return self.fetch(data_dir, allow_hub).pool

    def run(self, lm, docs, *, num_fewshot=None, log_samples=False, data_dir=None, pool=None, **opts):
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        dev = (pool if pool is not None else self.dev(data_dir)) if k else {}
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


def multiple_choice_tasks() -> list[Task]:
    return [
        MCTask("arc_easy", "1.0", "multiple_choice", "Question: {question}\nAnswer: {choice}", ("acc", "acc_norm"),
               fewshot_pool="none (0-shot)", local_path="arc/arc_easy_test.jsonl", hub="allenai/ai2_arc:ARC-Easy",
               template="Question: {question}\nAnswer:", split=HubSplit("allenai/ai2_arc", "ARC-Easy", "test"),
               from_hub=_arc_hub, local_reader=_arc_local),
        MCTask("arc_challenge", "1.0", "multiple_choice", "Question: {question}\nAnswer: {choice}",
               ("acc", "acc_norm"), fewshot_pool="none (0-shot)", local_path="arc/arc_challenge_test.jsonl",
               hub="allenai/ai2_arc:ARC-Challenge", template="Question: {question}\nAnswer:",
               split=HubSplit("allenai/ai2_arc", "ARC-Challenge", "test"), from_hub=_arc_hub,
               local_reader=_arc_local),
        MCTask("piqa", "1.0", "multiple_choice", "Question: {goal}\nAnswer: {sol}", ("acc", "acc_norm"),
               fewshot_pool="none (0-shot)", local_path="piqa/valid.jsonl", hub="baber/piqa",
               template="Question: {goal}\nAnswer:", split=HubSplit("baber/piqa", None, "validation"),
               from_hub=_piqa_hub, local_reader=_piqa_local, mc_question="{goal}"),
        MCTask("hellaswag", "1.0", "multiple_choice", "{activity_label}: {ctx} {ending} (lm-eval preprocessing)",
               ("acc", "acc_norm"), fewshot_pool="none (0-shot)",
               local_path="hellaswag/hellaswag_val_preprocessed.jsonl.gz", hub="Rowan/hellaswag", template="{query}",
               split=HubSplit("Rowan/hellaswag", None, "validation"), from_hub=_hellaswag_hub,
               local_reader=_hellaswag_local, mc_question="Which is the most likely continuation?\n{query} ...",
               decontam_id="idx"),
        MCTask("winogrande", "1.0", "multiple_choice",
               "partial scoring: {sentence up to _ with option} -> ' {rest of sentence}'", ("acc",),
               fewshot_pool="none (0-shot)", local_path="winogrande/winogrande_dev.jsonl",
               hub="allenai/winogrande:winogrande_xl", partial=True,
               split=HubSplit("allenai/winogrande", "winogrande_xl", "validation"), from_hub=_winogrande_hub,
               local_reader=_winogrande_local),
        MCTask("boolq", "2.0", "multiple_choice", "{passage}\nQuestion: {question}?\nAnswer: no|yes", ("acc",),
               fewshot_pool="none (0-shot)", local_path="boolq/boolq_dev.jsonl", hub="aps/super_glue:boolq",
               template="{passage}\nQuestion: {question}?\nAnswer:", split=HubSplit("aps/super_glue", "boolq",
                                                                                  "validation"),
               from_hub=_boolq_hub, local_reader=_boolq_local, mc_question="{passage}\n{question}?"),
        MCTask("openbookqa", "1.0", "multiple_choice", "{question_stem} {choice}", ("acc", "acc_norm"),
               fewshot_pool="none (0-shot)", local_path="openbookqa/openbookqa_test.jsonl",
               hub="allenai/openbookqa:main", template="{question}", split=HubSplit("allenai/openbookqa", "main",
                                                                                     "test"),
               from_hub=_obqa_hub, local_reader=_obqa_local),
        SIQATask("siqa", "1.0", "multiple_choice", "Q: {context} {question}\nA: {answer}", ("acc", "acc_norm"),
                 fewshot_pool="none (0-shot)", local_path="siqa/siqa_dev_2choice.jsonl", hub="lighteval/siqa",
                 template="Q: {context} {question}\nA:", split=HubSplit("lighteval/siqa", None, "validation"),
                 from_hub=_siqa_hub, local_reader=_siqa_local, mc_question="{context} {question}"),
        MMLUTask("mmlu", "1.0", "multiple_choice",
                 "The following are multiple choice questions (with answers) about {subject}.\n\n"
                 "[5 dev shots]{question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer: {letter}", ("acc", "acc_macro"),
                 num_fewshot=5, fewshot_pool="dev split, first k per subject", local_path="mmlu",
                 hub="cais/mmlu:<subject>", template="{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:",
                 decontam_files="mmlu/test/*.csv"),
    ]
