"""GSM8K: grade-school math word problems, scored by exact match of the last number (see README.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pkt_bench.api import Example, UserError
from pkt_bench.lmeval import LmEvalTask, TaskOptions, normalize
from pkt_bench.registry import register_task

@dataclass(frozen=True)
class GSM8KOptions(TaskOptions):
    num_fewshot: int = field(default=8, metadata={"help": "chain-of-thought exemplars before the question (0 to 8)"})

    def __post_init__(self) -> None:
        if not 0 <= self.num_fewshot <= 8:
            raise UserError(f"gsm8k's num_fewshot must be 0 to 8 (it has 8 exemplars), got {self.num_fewshot}")


@register_task("gsm8k")
@register_task("gsm8k-0shot", num_fewshot=0,
               description="GSM8K grade-school math, zero-shot: greedy, last number, exact match")
class GSM8K(LmEvalTask):
    description = "GSM8K grade-school math: 8-shot chain of thought, greedy, last number, exact match"
    reference = "tasks/gsm8k/README.md"
    version = "1"
    Config = GSM8KOptions
    lm_eval_task = "pkt_gsm8k"
    data_subdirs = ("gsm8k",)
    laten_name = "gsm"
    transfer_sizes = {"seed": 20, "align": 80, "train": 1000}
    generation = {"max_new_tokens": 512, "stop": ["\n"]}  # how a model answers a transfer prompt (distillation)

    def runtime_config(self) -> dict:
        shots = self.config.num_fewshot
        return {"num_fewshot": shots, **({} if shots else {"description": self.utils.ZERO_SHOT})}

    def transfer_pool(self) -> list[Example]:
        """Train problems as zero-shot prompts answered in the exemplars' chain-of-thought style."""
        utils = self.utils
        return [Example(utils.ZERO_SHOT + utils.question(doc), " " + utils.chain_of_thought(doc["answer"]), f"train:{i}",
                        doc=doc) for i, doc in enumerate(self.docs("train"))]

    def from_laten(self, user: str, assistant: str) -> Example:
        """LaTen's "Question: ..." / "Answer: ... So the answer is N." with "Answer:" moved to the prompt, as in
        the evaluation prompt."""
        if assistant.startswith("Answer:"):
            return Example(f"{user}\nAnswer:", assistant.removeprefix("Answer:"))
        return super().from_laten(user, assistant)

    def check(self, example: Example, completion: str) -> bool:
        """Whether a completion of a transfer prompt reaches the example's answer (last numbers equal)."""
        return self.utils.last_number(completion) == self.utils.last_number(example.response)

    def leaked(self, examples: Sequence[Example]) -> list[Example]:
        test = {normalize(doc["question"]) for doc in self.docs("test")}
        return [e for e in examples if normalize(e.prompt.split("Question:")[-1].split("\nAnswer:")[0]) in test]
