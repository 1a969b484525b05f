"""MMLU: 57-subject multiple choice, scored by the answer letter with the highest log-likelihood (see README.md)."""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pkt_bench.api import Example, UserError
from pkt_bench.lmeval import LmEvalTask, TaskOptions, choice_in, normalize
from pkt_bench.registry import register_task

_HEADER = re.compile(r"^The following are multiple choice questions \(with answers\) about [^\n]*\.\n\n")


@dataclass(frozen=True)
class MMLUOptions(TaskOptions):
    num_fewshot: int = field(default=0, metadata={"help": "dev questions of the same subject before the question (0 to 5)"})
    stratified_limit: bool = field(default=True, metadata={
        "help": "--limit N takes the first N // 57 questions of every subject (false: the first N in subject order)"})

    def __post_init__(self) -> None:
        if not 0 <= self.num_fewshot <= 5:
            raise UserError(f"mmlu's num_fewshot must be 0 to 5 (each subject has 5 dev questions), got {self.num_fewshot}")


@register_task("mmlu")
@register_task("mmlu-5shot", num_fewshot=5,
               description="MMLU 5-shot: highest log-likelihood letter, accuracy over all 14042 test questions")
class MMLU(LmEvalTask):
    description = "MMLU 0-shot: highest log-likelihood letter, accuracy over all 14042 test questions"
    reference = "tasks/mmlu/README.md"
    version = "2"
    Config = MMLUOptions
    lm_eval_task = "pkt_mmlu"
    data_subdirs = ("mmlu",)
    laten_name = "mmlu"
    transfer_sizes = {"seed": 20, "align": 80, "train": 1000}
    generation = {"max_new_tokens": 4, "stop": ["\n"]}  # how a model answers a transfer prompt (distillation)

    def dataset_options(self) -> dict:
        return {"num_fewshot": self.config.num_fewshot}

    def transfer_pool(self) -> list[Example]:
        """Dev and validation questions as zero-shot prompts answered with the gold letter."""
        utils = self.utils
        return [Example(utils.prompt(doc, []), " " + utils.LETTERS[doc["answer"]], f"{split}:{i}",
                        doc={**doc, "prompt": utils.prompt(doc, [])})
                for split in ("dev", "validation") for i, doc in enumerate(self.docs(split))]

    def from_laten(self, user: str, assistant: str) -> Example:
        """LaTen's "The answer is: X" becomes the bare letter that the evaluation scores after "Answer:"."""
        letter = choice_in(assistant.removeprefix("The answer is:"))
        return Example(user, f" {letter}") if letter else super().from_laten(user, assistant)

    def leaked(self, examples: Sequence[Example]) -> list[Example]:
        test = self._test_questions
        return [e for e in examples if normalize(_HEADER.sub("", e.prompt)) in test]

    @functools.cached_property
    def _test_questions(self) -> set[str]:
        """Each test question with its choices, normalized."""
        return {normalize(self.utils.question(doc)) for doc in self.docs("test")}

    def check(self, example: Example, completion: str) -> bool:
        """Whether a completion of a transfer prompt names the example's letter."""
        return choice_in(completion) == example.response.strip()

    def check_completion(self, completion: str) -> str | None:
        return None if choice_in(completion) else f"no answer letter A-D in completion {completion[:40]!r}"

    def select(self, limit: int | None) -> tuple[list[int] | None, str]:
        """With `stratified_limit`, the same number of questions from every subject: the first `limit // subjects`
        of each in file order (at least one; with fewer than one per subject, the first question of the first
        `limit` subjects)."""
        docs = self.docs("test")
        if not self.config.stratified_limit or limit is None or limit >= len(docs):
            return super().select(limit)
        by_subject: dict[str, list[int]] = {}
        for i, doc in enumerate(docs):
            by_subject.setdefault(doc["subject"], []).append(i)
        per = max(1, limit // len(by_subject))
        subjects = list(by_subject.values())[:limit]
        chosen = sorted(i for indices in subjects for i in indices[:per])
        return chosen, (f"stratified: the first {per} test question(s) of each of {len(subjects)} subjects in file "
                        f"order, {len(chosen)} of {len(docs)} items (--limit {limit})")

    def summary(self, items: list[dict]) -> dict[str, float]:
        """`top_letter_share`: the share of the most often predicted letter (0.25 for a balanced model; a
        collapsed one that answers B to everything shows near 1)."""
        if not items:
            return {}
        counts = Counter(item["prediction"] for item in items)
        return {"top_letter_share": max(counts.values()) / len(items)}

    def item_view(self, sample: dict) -> dict:
        loglikelihoods = [ll for ll, _ in sample["filtered_resps"]]
        letters = self.utils.LETTERS
        return {"target": letters[sample["target"]], "prediction": letters[loglikelihoods.index(max(loglikelihoods))],
                "loglikelihoods": [round(ll, 4) for ll in loglikelihoods]}
