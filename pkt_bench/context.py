"""`RunContext`: the runner's implementation of `pkt_bench.api.TransferContext`, the services a method may use
while transferring (its data, budget, stages, cache and the shared fine-tuning loop)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkt_bench import cache, data, formats, transferdata
from pkt_bench.api import VALIDATION_LOSS_EXAMPLES, Artifact, Example, Task, TransferContext
from pkt_bench.models import ModelPair
from pkt_bench.spec import Budget
from pkt_bench.stages import StageMeter

if TYPE_CHECKING:
    from pkt_bench.finetune import TrainStats


@dataclass
class RunContext(TransferContext):
    """One cell's `TransferContext` (documented there); `meter` times its stages, `training` and `data` collect
    what the record states about its fine-tunes and its train data."""

    pair: ModelPair
    task: Task
    budget: Budget
    seed: int
    workdir: Path
    meter: StageMeter
    costs: dict[str, int] = field(default_factory=dict)
    task_name: str = ""
    data_dir: str | None = None
    cache_dir: Path | None = None
    backend: str = "hf"
    transfer_format: str = "task"
    transfer_data: str = "gold"
    training: list[dict[str, Any]] = field(default_factory=list)  # each fine-tuning run's stats, for the record
    data: dict[str, Any] = field(default_factory=dict)  # what the train role held (source, counts, hash), for the record

    def stage(self, name: str):
        return self.meter.stage(name)

    def examples(self, role: str, n: int | None = None, seed: int | None = None) -> list[Example]:
        if role == "train" and self.transfer_data != "gold":
            return transferdata.generated(self, self.transfer_data, n if n is not None else self.budget.examples)
        chosen = self.render(data.sample(self.task.transfer_data(role), n, self.seed if seed is None else seed))
        if role == "train":
            self.data = transferdata.record("gold", chosen, tried=len(chosen))
        return chosen

    def render(self, examples: Sequence[Example]) -> list[Example]:
        tokenizer = student_tokenizer(self.pair.student.path) if self.transfer_format == "chat_template" else None
        return [formats.render(example, self.transfer_format, tokenizer, self.task) for example in examples]

    def cached(self, kind: str, identity: dict[str, Any], build: Callable[[Path], None]) -> Path:
        return cache.cached(self, kind, identity, build)

    def finetune(self, model: Any, tokenizer: Any, examples: list[Example] | None = None,
                 objective: Callable[[Any, dict], Any] | None = None) -> TrainStats:
        from pkt_bench.finetune import finetune  # torch: imported when a method trains, not when plugins are listed

        if examples is None:
            examples = self.examples("train", self.budget.examples)
        validation = self.render(getattr(self.task, "validation_data", list)()[:VALIDATION_LOSS_EXAMPLES])
        with self.stage("fine-tune"):
            stats = finetune(model, tokenizer, examples[: self.budget.examples], self.budget, self.seed, objective,
                             validation)
        self.costs["examples_seen"] = self.costs.get("examples_seen", 0) + stats.examples_seen
        self.costs["optimizer_steps"] = self.costs.get("optimizer_steps", 0) + stats.optimizer_steps
        self.training.append(dataclasses.asdict(stats))
        if getattr(objective, "first_terms", None):  # an objective's terms per token at its first micro-batch
            self.training[-1]["loss_terms_at_first_step"] = dict(objective.first_terms)
        return stats

    def save_merged(self, model: Any, tokenizer: Any) -> Artifact:
        path = self.workdir / "model"
        model.merge_and_unload().save_pretrained(path)
        tokenizer.save_pretrained(path)
        return Artifact(kind="model", path=str(path))

    def save_adapter(self, model: Any, tokenizer: Any) -> Artifact:
        path = self.workdir / "adapter"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return Artifact(kind="adapter", path=str(path), base=self.pair.student.path)


@functools.lru_cache(maxsize=4)
def student_tokenizer(path: str) -> Any:
    """The student's tokenizer, loaded once per process (rendering runs per generation round and per fine-tune)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
