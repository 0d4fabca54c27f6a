"""Generation with chain of thought: GSM8K (8-shot CoT, strict and flexible extraction) and BIG-Bench Hard
(27 tasks, the official 3-shot CoT prompts, exact match after answer extraction).

GSM8K prompt: the 8 chain-of-thought exemplars of Wei et al. (2022) (as in lm-eval `gsm8k_cot`), each
"Q: {question}\nA: {reasoning} The answer is N.", joined by "\n\n", then "Q: {question}\nA:". Greedy, stop at
"Q:", "</s>", "<|im_end|>" or a blank line; at most 256 new tokens. strict = number after "The answer is",
flexible = last number in the output; both compared with lm-eval's normalisation (no commas/$, no final '.').

BBH prompt: the task's official cot-prompts/<task>.txt (description + 3 exemplars with "Let's think step by
step."; shipped in bbh_cot_prompts/), then "\n\nQ: {input}\nA: Let's think step by step.\n". Greedy, stop at a
blank line or "\nQ:", at most 256 new tokens (lm-eval allows 1024). Answer = text after "the answer is" without a
final period; exact match.

Data: openai/gsm8k (main, test) and SaylorTwift/bbh (<task>, test), lm-eval's, or local copies (phiforge.eval.data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from phiforge.errors import DataError
from phiforge.eval.data import HubSplit, load_docs, read_jsonl
from phiforge.eval.metrics import (
    bbh_extract,
    gsm8k_flexible,
    gsm8k_normalize,
    gsm8k_strict,
    gsm8k_target,
    macro_mean_stderr,
    mean_stderr,
)
from phiforge.eval.tasks.base import (
    Task,
    TaskData,
    TaskResult,
    check_subjects,
    limit_per_subtask,
    subtask_data,
)
from phiforge.lm import GenRequest, Sampling

GSM8K_COT_SHOTS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]

GEN_MAX_TOKENS = 256


@dataclass
class GSM8KTask(Task):
    stop: tuple[str, ...] = ("Q:", "</s>", "<|im_end|>", "\n\n")
    max_tokens: int = GEN_MAX_TOKENS

    def hub_splits(self, subjects=None):
        return [HubSplit("openai/gsm8k", "main", "test")]

    def fetch(self, data_dir=None, allow_hub=True, subjects=None):
        def doc(d: dict) -> dict:
            return {"question": d["question"], "answer": d["answer"]}

        docs, src = load_docs(self.name, self.hub_splits()[0], doc, data_dir, allow_hub=allow_hub,
                              release=self.local_path, read_release=lambda p: [doc(d) for d in read_jsonl(p)])
        return TaskData(docs, [src])

    def prompt(self, doc: dict, k: int) -> str:
        shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in GSM8K_COT_SHOTS[:k])
        return f"{shots}Q: {doc['question']}\nA:"

    def run(self, lm, docs, *, num_fewshot=None, log_samples=False, data_dir=None, max_tokens=None, **opts):
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        if k > len(GSM8K_COT_SHOTS):
            raise DataError(f"gsm8k: at most {len(GSM8K_COT_SHOTS)} CoT exemplars, asked for {k}")
        settings = Sampling(max_new_tokens=max_tokens or self.max_tokens, stop=self.stop)
        reqs = [GenRequest(self.prompt(d, k), settings) for d in docs]
        outs = lm.generate_until(reqs) if reqs else []
        strict, flex, samples = [], [], []
        for d, out in zip(docs, outs):
            gold = gsm8k_normalize(gsm8k_target(d["answer"]))
            s, f = gsm8k_strict(out), gsm8k_flexible(out)
            strict.append(float(gsm8k_normalize(s) == gold))
            flex.append(float(gsm8k_normalize(f) == gold))
            if log_samples:
                samples.append({"question": d["question"], "target": gold, "output": out, "strict": s,
                                "flexible": f, "strict_match": strict[-1], "flexible_match": flex[-1]})
        return TaskResult({"exact_match_strict": mean_stderr(strict), "exact_match_flexible": mean_stderr(flex)},
                          len(docs), [], samples)


BBH_TASKS = ["boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects", "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects", "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies", "word_sorting"]


COT_PROMPTS = Path(__file__).with_name("bbh_cot_prompts")


def bbh_cot_prompt(path: Path) -> str:
    """The official CoT prompt without its canary line and '-----' separator, each exemplar's reasoning on the line
    after "A: Let's think step by step." as lm-eval renders them (sports_understanding's file has it on the same
    line; the question itself ends with that line in every task)."""
    text = path.read_text(encoding="utf-8")
    if "-----\n" in text:
        text = text.split("-----\n", 1)[1]
    return text.strip("\n").replace("\nA: Let's think step by step. ", "\nA: Let's think step by step.\n")


@dataclass
class BBHTask(Task):
    """All 27 BBH tasks (or one, with `subtask`); reports exact match per task, micro and macro averages."""

    subtask: str | None = None
    stop: tuple[str, ...] = ("\n\n", "\nQ:", "</s>")
    max_tokens: int = GEN_MAX_TOKENS

    def subjects(self):
        return [self.subtask] if self.subtask else list(BBH_TASKS)

    def subtasks(self) -> list[str]:
        return self.subjects()

    def select(self, docs, limit):
        return limit_per_subtask(docs, limit, "task")  # --limit N: N examples of every BBH task, as lm-eval

    def hub_splits(self, subjects=None):
        return [HubSplit("SaylorTwift/bbh", t, "test") for t in check_subjects(self, subjects)]

    def fetch(self, data_dir=None, allow_hub=True, subjects=None):
        def part(t: str):
            def release(p: Path) -> list[dict]:
                try:
                    examples = json.loads(p.read_text(encoding="utf-8"))["examples"]
                except (ValueError, KeyError) as e:
                    raise DataError(f"{p}: not a BBH task file ({e})") from None
                return [{"task": t, "input": e["input"], "target": e["target"]} for e in examples]

            docs, src = load_docs(self.name, HubSplit("SaylorTwift/bbh", t, "test"),
                                  lambda r: {"task": t, "input": r["input"], "target": r["target"]}, data_dir,
                                  allow_hub=allow_hub, release=f"bbh/bbh/{t}.json", read_release=release)
            return docs, [src], None

        return subtask_data(self, check_subjects(self, subjects), part, subjects)

    def prompts(self, data_dir=None) -> dict[str, str]:
        """The official CoT prompt of each task (shipped with phiforge: bbh_cot_prompts/<task>.txt)."""
        return {t: bbh_cot_prompt(COT_PROMPTS / f"{t}.txt") for t in self.subtasks()}

    def run(self, lm, docs, *, num_fewshot=None, log_samples=False, data_dir=None, max_tokens=None, **opts):
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        heads = self.prompts(data_dir) if k else {}
        if k not in (0, 3):
            raise DataError("bbh: the official CoT prompts have 3 exemplars: use --num-fewshot 3 (or 0)")
        reqs = []
        settings = Sampling(max_new_tokens=max_tokens or self.max_tokens, stop=self.stop)
        for d in docs:
            head = heads[d["task"]] + "\n\n" if k else ""
            reqs.append(GenRequest(f"{head}Q: {d['input']}\nA: Let's think step by step.\n", settings))
        outs = lm.generate_until(reqs) if reqs else []
        per: dict[str, list[float]] = {}
        samples = []
        for d, out in zip(docs, outs):
            pred = bbh_extract(out)
            ok = float(pred == d["target"].strip())
            per.setdefault(d["task"], []).append(ok)
            if log_samples:
                samples.append({"task": d["task"], "input": d["input"], "target": d["target"], "output": out,
                                "extracted": pred, "exact_match": ok})
        allv = [x for v in per.values() for x in v]
        parts = {t: mean_stderr(v) for t, v in per.items()}
        metrics = {"exact_match": mean_stderr(allv)}
        if len(parts) > 1:
            metrics["exact_match_macro"] = macro_mean_stderr(list(parts.values()))
        res = TaskResult(metrics, len(docs), [], samples)
        res.extra["subtasks"] = {t: {"exact_match": m, "exact_match_stderr": se, "n": len(per[t])}
                                 for t, (m, se) in parts.items()}
        return res


def generation_tasks() -> list[Task]:
    tasks: list[Task] = [
        GSM8KTask("gsm8k", "3.0", "generate_until", "[8 CoT exemplars]Q: {question}\nA:",
                  ("exact_match_strict", "exact_match_flexible"), num_fewshot=8,
                  fewshot_pool="the 8 Wei et al. (2022) CoT exemplars", local_path="gsm8k/test.jsonl",
                  hub="openai/gsm8k:main"),
        BBHTask("bbh", "4.0", "generate_until",
                "[cot-prompts/<task>.txt]\n\nQ: {input}\nA: Let's think step by step.\n",
                ("exact_match", "exact_match_macro"), num_fewshot=3, fewshot_pool="official CoT prompts",
                local_path="bbh", hub="lukaemon/bbh", notes="27 tasks; --limit applies per task",
                decontam_files="bbh/bbh/*.json"),
    ]
    for t in BBH_TASKS:
        tasks.append(BBHTask(f"bbh_{t}", "4.0", "generate_until",
                             "[cot-prompts/" + t + ".txt]\n\nQ: {input}\nA: Let's think step by step.\n",
                             ("exact_match",), num_fewshot=3, fewshot_pool="official CoT prompt",
                             local_path="bbh", hub="lukaemon/bbh", subtask=t, decontam_files=f"bbh/bbh/{t}.json"))
    return tasks
