"""The interfaces every transfer method and task plugs into.

Vocabulary used across pkt-bench:

- *teacher* / *student*: the larger and the smaller model of one family; knowledge moves teacher -> student.
- *transfer method*: turns a (teacher, student) pair plus a task's transfer data into an `Artifact`, a student
  that can be evaluated (a PEFT adapter folder over the student, or a full HF model folder).
- *transfer data*: prompt/response `Example`s of a task in three roles: `seed` (a few samples that locate
  knowledge in the teacher, "extract" in the LaTen paper), `align` (to fit an alignment, e.g. LaTen's translator)
  and `train` (fine-tuning data, under the run's `Budget`).
- *cell*: one (method + config, pair, task, seed) combination; it yields one result record.

This module imports no torch, so listing plugins stays cheap: methods and tasks import heavy modules inside
their functions. It imports nothing of pkt_bench either: it is the ground floor every other module stands on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from pathlib import Path

ROLES = ("seed", "align", "train")
VALIDATION_LOSS_EXAMPLES = 32
"""Validation examples (gold answers) whose loss each fine-tune records before and after training."""
SOURCES = ("gold", "teacher", "self")
"""Where the train role's answers come from (`--transfer-data`, `pkt_bench.transferdata`): the task's own (gold),
the teacher's or the student's own answers that the task's scorer marks correct."""


class UserError(Exception):
    """Bad input from the user. The CLI prints the message as one line and exits with code 2."""


@dataclass(frozen=True)
class Example:
    """One prompt/response pair. Loss is taken on the response only; `prompt + response` is the full text.

    `chat` is the example as one (user, assistant) exchange, for a task whose chat protocol asks for another answer
    form than its plain prompt does (the code tasks: the program in a Python block, as their chat evaluations
    write it); the transfer formats that write a chat use it (`pkt_bench.formats`). None: the prompt and response
    are the exchange.

    `doc` is the task document the example was made from, in the schema of the task's test documents: a task whose
    chat evaluation is an lm-eval config renders it with that config (`chat_context`), so that a transfer prompt
    in the chat format is exactly what the evaluation would send for it; tasks that run code also judge generated
    answers with it (`check_all`)."""

    prompt: str
    response: str
    id: str = ""
    chat: tuple[str, str] | None = None
    doc: dict[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Artifact:
    """What a transfer method hands to evaluation, on disk so that any backend can load it.

    kind "adapter": a PEFT adapter folder at `path` to apply over the model `base` (a HF id or folder).
    kind "model": a complete HF model folder (or HF id) at `path`.
    """

    kind: Literal["adapter", "model"]
    path: str
    base: str | None = None


@dataclass
class EvalResult:
    """A task's verdict on one artifact: its metrics, which one ranks methods, per-item outcomes, and how it was
    evaluated (`details`: engine version, effective generation settings, an example prompt, ...)."""

    metrics: dict[str, float]
    primary_metric: str
    items: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class Generator(Protocol):
    """Text generation backend: greedy continuation of prompts, cut at the first stop sequence."""

    name: str

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]: ...


class EvalTarget(Protocol):
    """The thing a task evaluates: an artifact plus lazily loaded views of it."""

    artifact: Artifact

    def model_and_tokenizer(self) -> tuple[Any, Any]: ...

    def generator(self) -> Generator: ...

    def lm_eval_model(self) -> Any:
        """The artifact as an lm-eval model (`lm_eval.api.model.LM`) of the target's backend."""
        ...

    def close(self) -> None:
        """Release what the views loaded (model, engine), so the next model has its memory."""
        ...


class Task(Protocol):
    """A task: transfer data in three roles and an evaluation. Constructed as `TaskClass(data_dir)`, or, when
    the class has a `Config` dataclass of task options, `TaskClass(data_dir, config)`; a task that runs
    model-written code sets `executes_code = True` and takes `allow_code_execution=True` as well.

    `version` changes whenever the prompt or the scoring changes; it is part of every record's key.
    `transfer_version` (optional, "1" when absent) changes whenever the examples `transfer_data` returns change;
    it is part of the key of every record and cached extraction that reads them. A task may also define
    `check_pair(pair)`, raising `UserError` before anything runs if it cannot evaluate that pair;
    `generation = {"max_new_tokens": N, "stop": [...]}`, how a model answers its transfer prompts (used by
    distillation); with gold answers, `check(example, completion) -> bool` for a transfer example (or
    `check_all(examples, completions) -> list[bool]`, judged in one batch: the code tasks run them); and
    `validation_data()`, examples disjoint from every role and from the test items, for model selection.
    The name is the one given at registration (`@register_task("name")`).
    """

    description: ClassVar[str]
    reference: ClassVar[str]
    version: ClassVar[str]

    def transfer_data(self, role: str) -> list[Example]: ...

    def evaluate(self, target: EvalTarget, limit: int | None) -> EvalResult: ...


class TransferMethod(Protocol):
    """A transfer method. Constructed as `MethodClass(config)` with an instance of its `Config` dataclass,
    whose fields carry their help text in `field(metadata={"help": ...})`.

    `fine_tunes` says whether the method runs the shared fine-tuning loop; only then is the run's budget part
    of the cell's identity. A method sets `version` (a string, optional) when what it computes changes under the
    same options: it is part of every record's key, so older records are not reused for the new computation. A method with nothing random sets `seeded = False` (the student and teacher as
    they are): it runs at seed 0 whatever the run's seed, so one record serves every seed. The name is the one given at registration (`@register_method("name")`); one class
    may be registered under several names with preset config values.

    A method with an extraction stage (what it takes from the teacher before any fine-tuning) also defines
    `extract(ctx, out)`, writing its files into the folder `out`; `pkt-bench extract` calls it, and `transfer`
    reaches it through `ctx.cached(...)` so that runs differing only in what comes after reuse it.

    A method whose options can be wrong for a pair (a LoRA rank of 0, a target module the student lacks), or
    that cannot work on some pairs (graft needs a lineage), also defines `check(pair)`, raising `UserError`; the runner calls it before the first cell.
    """

    description: ClassVar[str]
    reference: ClassVar[str]
    Config: ClassVar[type]
    fine_tunes: ClassVar[bool]

    def transfer(self, ctx: TransferContext) -> Artifact: ...


class TransferContext(Protocol):
    """Everything a method may use while transferring; the one place that hands out data, budget and stages.

    The runner hands each method a `pkt_bench.context.RunContext`, which implements this interface.
    """

    pair: Any  # pkt_bench.models.ModelPair: teacher and student, `pair.load("student") -> (model, tokenizer)`
    task: Task
    budget: Any  # pkt_bench.spec.Budget: the fine-tuning budget shared by every method of a comparison
    seed: int
    workdir: Path
    costs: dict[str, int]  # what the transfer spent (passes, tokens, steps), added to by the services below
    task_name: str
    transfer_format: str  # resolved (pkt_bench.formats): how `examples` writes the task's examples out
    transfer_data: str  # SOURCES: whose answers the train role holds (pkt_bench.transferdata)

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Time a stage ("extract", "fine-tune", ...) with its peak memory; the rest counts as "transfer"."""
        ...

    def examples(self, role: str, n: int | None = None, seed: int | None = None) -> list[Example]:
        """`n` examples of `role` (all when None), a sample fixed by `seed` (default: the run's seed), written in
        the run's transfer format. With `transfer_data` other than gold, the train role is the `n` generated
        examples (`pkt_bench.transferdata`), the same for every seed and method."""
        ...

    def render(self, examples: Sequence[Example]) -> list[Example]:
        """`examples` written in the run's transfer format (`pkt_bench.formats.render`)."""
        ...

    def cached(self, kind: str, identity: dict[str, Any], build: Callable[[Path], None]) -> Path:
        """The folder `build(folder)` fills, built once per content hash and reused afterwards.

        The hash covers `kind`, `identity` (everything of the method's config and inputs the folder depends on)
        and, always, the pair's identities, device type and dtype, the task with its version and the data dir.
        The costs `build` adds to `self.costs` are stored beside it and added again on reuse, so a record
        states what its result cost; `costs["reused"]` counts the reuses. With no cache dir (`pkt-bench
        extract`), the folder is built fresh inside the workdir.
        """
        ...

    def finetune(self, model: Any, tokenizer: Any, examples: list[Example] | None = None,
                 objective: Callable[[Any, dict], Any] | None = None) -> Any:
        """Train `model`'s trainable parameters (a PEFT model) with the shared loop, under the run's budget; return
        its `pkt_bench.finetune.TrainStats`.

        `examples` defaults to the budget's sample of the task's train data; a method that rewrites the responses
        (distillation) passes its own, at most as many. `objective(model, batch)` replaces the cross-entropy: see
        `pkt_bench.finetune`.
        """
        ...

    def save_merged(self, model: Any, tokenizer: Any) -> Artifact:
        """Merge a PEFT model's adapter into its base and save the whole model (for inits that change the base)."""
        ...

    def save_adapter(self, model: Any, tokenizer: Any) -> Artifact:
        """Save a PEFT model's adapter (and the tokenizer) into the workdir; return it as an artifact."""
        ...
