"""MBPP: 500 short Python problems (task_ids 11-510), pass@k of the model's programs (see README.md)."""

from __future__ import annotations

from collections.abc import Sequence

from pkt_bench.api import Example
from pkt_bench.lmeval import CodeTask, normalize
from pkt_bench.registry import register_task

@register_task("mbpp")
class MBPP(CodeTask):
    description = "MBPP test split (task_ids 11-510), 3-shot, run against the asserts; pass@1 greedy"
    reference = "tasks/mbpp/README.md"
    version = "1"
    transfer_version = "2"  # 2: a chat exchange for the chat formats, without "[DONE]" (pkt_bench.formats)
    lm_eval_task = "pkt_mbpp"
    data_subdirs = ("mbpp",)
    laten_name = "mbpp"
    transfer_sizes = {"seed": 32, "align": 40, "train": 300}

    def item_id(self, index: int, doc: dict) -> str:
        return str(doc["task_id"])

    def transfer_pool(self, split: str = "train") -> list[Example]:
        """Train problems (task_ids 601-974) as zero-shot prompts answered with the reference code; in a chat, the
        chat protocol's prompt answered with the code in a Python block."""
        utils = self.utils
        return [Example(utils.prompt(doc), f"{doc['code']}\n[DONE]", f"mbpp:{doc['task_id']}",
                        chat=(utils.chat_prompt(doc), utils.chat_answer(doc)), doc=doc)
                for doc in self.docs(split)]

    def validation_data(self) -> list[Example]:
        """MBPP's own validation split (task_ids 511-600), written as the train problems are."""
        return self.transfer_pool("validation")

    def leaked(self, examples: Sequence[Example]) -> list[Example]:
        """Examples that state a test problem's text (MBPP itself repeats a few texts across splits)."""
        test = [normalize(doc["text"]) for doc in self.docs("test")]
        texts = [normalize(e.prompt) for e in examples]
        return [e for e, text in zip(examples, texts) if any(t in text for t in test)]
