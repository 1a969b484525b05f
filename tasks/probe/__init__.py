"""The planted-knowledge probe: exact match on facts that only a pico teacher was trained on (see README.md)."""

from __future__ import annotations

from pathlib import Path

from pkt_bench import pico
from pkt_bench.api import EvalResult, EvalTarget, Example, UserError
from pkt_bench.registry import register_task


@register_task("probe")
class Probe:
    description = "planted-knowledge probe: held-out facts only the pico teachers know (exact match)"
    reference = "tasks/probe/README.md"
    version = "2"
    transfer_format = "task"  # what `--transfer-format auto` means here: the pico tokenizer has no <|user|>
    data_subdirs = None  # reads no local data folder: its keys do not depend on --data-dir / PKT_BENCH_DATA

    generation = {"max_new_tokens": 2, "stop": []}  # how a teacher answers a transfer prompt (distillation)

    def __init__(self, data_dir: str | Path | None = None, config: pico.PicoConfig = pico.DEFAULT):
        self.config = config
        self.world = config.world

    def transfer_data(self, role: str) -> list[Example]:
        """All roles draw on the transfer facts (seeds are a subset of the train data, as in the Seeking paper)."""
        return [Example(fact.prompt, fact.response, fact.id) for fact in self.world.transfer]

    def check(self, example: Example, completion: str) -> bool:
        """Whether a completion of a transfer example names the right value."""
        return completion.split()[:1] == example.response.split()[:1]

    def check_pair(self, pair) -> None:
        from transformers import AutoTokenizer

        if self.world.held_out[0].entity not in AutoTokenizer.from_pretrained(pair.student.path).get_vocab():
            raise UserError("the probe task only works with the pico pairs (its facts are in no other model's "
                            "vocabulary); drop --teacher/--student, use --pair (`pkt-bench list pairs`) or pick "
                            "another --task")

    def evaluate(self, target: EvalTarget, limit: int | None) -> EvalResult:
        facts = self.world.held_out[:limit]
        outputs = target.generator().generate([fact.prompt for fact in facts], max_new_tokens=2, stop=["."])
        items = []
        for fact, output in zip(facts, outputs):
            answer = output.split()[0] if output.split() else ""
            items.append({"id": fact.id, "prompt": fact.prompt, "target": fact.value, "output": output,
                          "exact_match": float(answer == fact.value)})
        accuracy = sum(item["exact_match"] for item in items) / len(items)
        return EvalResult(metrics={"exact_match": accuracy}, primary_metric="exact_match", items=items,
                          details={"chance": self.config.chance, "world": self.config.digest()})
