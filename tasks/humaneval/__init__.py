"""HumanEval: 164 hand-written Python problems, pass@k of the model's completions (see README.md)."""

from __future__ import annotations

from collections.abc import Sequence

from pkt_bench.api import Example
from pkt_bench.lmeval import CodeTask, normalize
from pkt_bench.registry import register_task


@register_task("humaneval")
class HumanEval(CodeTask):
    description = "HumanEval: complete the function, run its tests; pass@1 greedy (pass@k from n samples)"
    reference = "tasks/humaneval/README.md"
    version = "1"
    transfer_version = "3"  # 3: MBPP's problems as HumanEval problems (1: MBPP's plain form; 2: MBPP's chat form)
    lm_eval_task = "pkt_humaneval"
    data_subdirs = ("humaneval", "mbpp")  # its transfer data are MBPP's train problems
    laten_name = "humaneval"
    transfer_sizes = {"seed": 20, "align": 80, "train": 1000}

    def item_id(self, index: int, doc: dict) -> str:
        return doc["task_id"]

    def transfer_pool(self, split: str = "train") -> list[Example]:
        """HumanEval has no train split: MBPP's train problems (task_ids 601-974) written as HumanEval problems
        (`utils.from_mbpp`), signature and docstring for the prompt and the rest of the code for the completion;
        in a chat, as the chat protocol writes them. Problem 966, with a comment after its signature, is left out."""
        from pkt_bench.tasks.mbpp import MBPP

        utils, examples = self.utils, []
        for doc in MBPP(self.data_dir, allow_code_execution=True).docs(split):
            if (problem := utils.from_mbpp(doc)) is not None:
                prompt, completion = problem
                chat = (utils.chat_prompt({"prompt": prompt}), utils.chat_answer({"prompt": prompt}, completion))
                tests = {key: doc[key] for key in ("test_list", "test_setup_code")}  # judge generated answers
                examples.append(Example(prompt, completion, f"mbpp:{doc['task_id']}", chat=chat, doc={
                    "task_id": f"mbpp:{doc['task_id']}", "prompt": prompt, "test": "\n".join(doc["test_list"]),
                    "entry_point": "", **tests}))
        return examples

    def validation_data(self) -> list[Example]:
        """MBPP's validation problems (task_ids 511-600), written as HumanEval problems as the train ones are."""
        return self.transfer_pool("validation")

    def transfer_program(self, doc: dict, completion: str) -> str:
        """A transfer example's problem (MBPP's, as a HumanEval prompt), the completion, then MBPP's asserts."""
        return f"{doc['prompt']}{completion}\n\n{doc['test_setup_code']}\n" + "\n".join(doc["test_list"]) + "\n"

    def leaked(self, examples: Sequence[Example]) -> list[Example]:
        """Examples holding a problem's signature line and the first line of its docstring."""
        keys = []
        for doc in self.docs("test"):
            lines = [line.strip() for line in doc["prompt"].splitlines()]
            signature = next(i for i, line in enumerate(lines) if line.startswith(f"def {doc['entry_point']}("))
            docstring = next(line.strip("\"' ") for line in lines[signature + 1:] if line.strip("\"' "))
            keys.append((normalize(lines[signature]), normalize(docstring)))
        texts = [normalize(e.prompt + "\n" + e.response) for e in examples]
        return [e for e, text in zip(examples, texts) if any(s in text and d in text for s, d in keys)]
