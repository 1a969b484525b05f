"""What to run: the `RunSpec` (from YAML and/or CLI flags), its `Budget`, and the cells it expands to.

A *cell* is one (method + config, pair, task, seed) combination; its key is a content hash of everything that
can change its result, so a stored record is found again (and skipped) exactly when rerunning would repeat it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pkt_bench.api import UserError

SCHEMA_VERSION = 1
AUTOCASTS = ("off", "bf16", "auto")
SCHEDULES = ("linear", "constant")
NEUTRAL_BUDGET_FIELDS = ("gradient_checkpointing",)
"""Budget fields that change how the fine-tuning loop runs, not what it computes (checkpointing recomputes the same
activations): each fine-tune's stats record them, and cell keys hold their defaults, so a cell run either way is
one cell and its record is found again."""

LATER_BUDGET_FIELDS = ("schedule",)
"""Budget fields added after records were first stored: absent from keys at their defaults."""


class SpecKeyError(UserError):
    """A bad value under one top-level key of a spec; YAML loading adds the key's line."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Budget:
    """The fine-tuning budget, equal for every method that fine-tunes (so comparisons are fair)."""

    examples: int = field(default=1000, metadata={"help": "train examples drawn from the task's transfer data"})
    epochs: int = field(default=3, metadata={"help": "passes over those examples"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate of AdamW"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps with linear warmup"})
    schedule: str = field(default="linear", metadata={
        "help": "learning rate after the warmup: linear (decay to 0, HF Trainer's default) or constant"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    max_length: int = field(default=1024, metadata={"help": "tokens per example (prompt + response), cut beyond"})
    autocast: str = field(default="off", metadata={
        "help": "bf16 autocast of the forward pass over fp32 weights: off, bf16, or auto (bf16 on a CPU with bf16 "
                "instructions for an fp32 model)"})
    group_by_length: bool = field(default=False, metadata={
        "help": "micro-batches of similar lengths (less padding; the batches' order stays seeded)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the decoder's activations in the backward pass (less memory, ~1/3 more compute)"})

    def __post_init__(self) -> None:
        for name in ("examples", "epochs", "batch_size", "grad_accum", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"budget {name} must be a positive integer, got {value!r}; e.g. --{_flag(name)} 8")
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise UserError(f"budget {name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"budget warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"budget schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.autocast not in AUTOCASTS:
            raise UserError(f"budget autocast must be one of {', '.join(AUTOCASTS)}, got {self.autocast!r}")
        for name in ("group_by_length", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"budget {name} must be true or false, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise UserError(f"budget weight_decay must be >= 0, got {self.weight_decay!r}")

    def keyed(self) -> dict[str, Any]:
        """The budget as cell keys and records' `cell` see it: `NEUTRAL_BUDGET_FIELDS` at their defaults, and
        `LATER_BUDGET_FIELDS` left out at theirs (so keys made before those fields existed still hold)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        out = {**dataclasses.asdict(self), **{k: defaults[k] for k in NEUTRAL_BUDGET_FIELDS}}
        return {k: v for k, v in out.items() if not (k in LATER_BUDGET_FIELDS and v == defaults[k])}

    def optimizer_steps(self, n_examples: int) -> int:
        """Optimizer steps the shared loop takes on `n_examples` (the last accumulation group may be short)."""
        micro_batches = math.ceil(n_examples / self.batch_size) * self.epochs
        return math.ceil(micro_batches / self.grad_accum)


BUDGET_PRESETS: dict[str, dict[str, Any]] = {
    "seeking": dict(examples=1000, epochs=3, batch_size=8, grad_accum=8, lr=3e-4, warmup_ratio=0.03,
                    weight_decay=0.0, max_grad_norm=1.0, max_length=2048),
    "laten": dict(examples=1000, epochs=5, batch_size=8, grad_accum=8, lr=3e-4, warmup_ratio=0.03,
                  weight_decay=0.0, max_grad_norm=1.0, max_length=1024),
    "semalign": dict(examples=1000, epochs=5, batch_size=8, grad_accum=8, lr=3e-4, warmup_ratio=0.0,
                     schedule="constant", weight_decay=0.0, max_grad_norm=1.0, max_length=1024),
}
"""The papers' fine-tuning recipes, every `Budget` field set (`budget: seeking` in a spec, `--budget seeking`).

- `seeking`: ParaKnowTransfer's `train.sh` (Zhong et al. 2024): 1000 examples, 3 epochs, global batch 64 (8 per
  device on 2 GPUs × accumulation 4; here 8 × 8 on one device: the same optimizer steps, ≈ 47 for 1000 × 3), lr 3e-4,
  HF Trainer's warmup 0.03 then linear decay, no weight decay, clipping 1.0, cutoff 2048.
- `laten`: the PostPKT recipe of Neural Incompatibility (Tan et al. 2025, App. A.2 / SemAlign Table 5) for MMLU and
  GSM8K: 1000 examples, 5 epochs, batch 64, lr 3e-4, cutoff 1024 (its README; its shell script uses 768); the
  Trainer's other defaults as above. HumanEval used 3 epochs at lr 3e-5 and MBPP 300 examples: add
  `--epochs 3 --lr 3e-5` or `--examples 300` (flags override a preset's fields).
- `semalign`: SemAlign v1's Table 5 (Gu et al. 2025, App. A.2) for MMLU and GSM8K: 1000 examples, 5 epochs, batch 64,
  lr 3e-4; HumanEval 3 epochs at lr 3e-5, MBPP 300 examples (add the flags as for `laten`). v1 states no optimizer,
  schedule, warmup, clipping or cutoff: AdamW at a constant lr without warmup (the reading of
  `shared/reference/semalign.md` §3), clipping 1.0 and LaTen's cutoff 1024 (the protocol v1 says it follows) are
  our picks, listed among the open choices in `methods/semalign/README.md`.
"""


@dataclass
class RunSpec:
    """One `pkt-bench run`: a method with its config, a teacher/student pair, tasks, a seed and a budget.

    The defaults are the embedded, offline probe: the in-process `pico` pair on the planted-knowledge task.
    """

    method: str = "lora"
    method_config: dict[str, Any] = field(default_factory=dict)
    teacher: str = "pico-teacher"
    student: str = "pico-student"
    tasks: list[str] = field(default_factory=lambda: ["probe"])
    seed: int = 0
    budget: Budget = field(default_factory=Budget)
    data_dir: str | None = None
    backend: str = field(default_factory=lambda: os.environ.get("PKT_BENCH_BACKEND") or "auto")  # a machine's default
    dtype: str = "auto"
    device: str = "auto"
    limit: int | None = None
    references: bool = True
    task_options: dict[str, Any] = field(default_factory=dict)
    allow_code_execution: bool = False
    eval_batch_size: int = 16
    fit_context: bool = False  # let a generation task run on a pair whose context cannot hold its protocol
    vllm_args: dict[str, Any] = field(default_factory=dict)  # vLLM engine settings (max_model_len, ...)
    transfer_format: str = "auto"
    transfer_data: str = "gold"  # whose answers the fine-tuning methods train on (pkt_bench.transferdata)
    select: dict[str, Any] = field(default_factory=dict)  # learning-rate selection on validation (pkt_bench.selection)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunSpec:
        """Read a spec file; any error names the file and line."""
        path = Path(path)
        data, lines = read_yaml(path, "spec")
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise UserError(f"{path}:1: a spec must be a mapping of keys (method:, teacher:, ...), got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except SpecKeyError as error:
            raise UserError(f"{path}:{lines.get(error.key, 1)}: {error}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise SpecKeyError(key, f"unknown spec key '{key}'; known keys: {', '.join(known)}")
        values = dict(data)
        if "budget" in values:
            try:
                values["budget"] = make_budget(values["budget"] or {})
            except UserError as error:
                raise SpecKeyError("budget", str(error)) from None
        if isinstance(values.get("tasks"), str):
            values["tasks"] = [values["tasks"]]
        spec = cls(**values)
        spec.check_types()
        return spec

    def check_types(self) -> None:
        expected = {
            "method": str, "teacher": str, "student": str, "backend": str, "dtype": str, "device": str,
            "seed": int, "method_config": dict, "tasks": list, "references": bool, "task_options": dict,
            "allow_code_execution": bool, "eval_batch_size": int, "fit_context": bool,
            "vllm_args": dict, "transfer_format": str, "transfer_data": str, "select": dict,
        }
        for key, kind in expected.items():
            value = getattr(self, key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise SpecKeyError(key, f"spec key '{key}' must be a {kind.__name__}, got {value!r}")
        if not 0 <= self.seed < 2**32:
            raise SpecKeyError("seed", f"spec key 'seed' must be an integer from 0 to 2**32 - 1, got {self.seed}")
        if not self.tasks or not all(isinstance(task, str) for task in self.tasks):
            raise SpecKeyError("tasks", f"spec key 'tasks' must be a non-empty list of task names, got {self.tasks!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit <= 0):
            raise SpecKeyError("limit", f"spec key 'limit' must be a positive integer, got {self.limit!r}")
        if self.eval_batch_size <= 0:
            raise SpecKeyError("eval_batch_size", f"spec key 'eval_batch_size' must be positive, got {self.eval_batch_size}")
        if self.dtype not in DTYPES:
            raise SpecKeyError("dtype", f"spec key 'dtype' must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        from pkt_bench.formats import CHOICES

        if self.transfer_format not in CHOICES:
            raise SpecKeyError("transfer_format", f"spec key 'transfer_format' must be one of {', '.join(CHOICES)}, "
                                                  f"got {self.transfer_format!r}")
        from pkt_bench.selection import normalize

        try:
            self.select = normalize(self.select)
        except UserError as error:
            raise SpecKeyError("select", f"spec key 'select': {error}") from None
        from pkt_bench.api import SOURCES

        if self.transfer_data not in SOURCES:
            raise SpecKeyError("transfer_data", f"spec key 'transfer_data' must be one of {', '.join(SOURCES)}, "
                                                f"got {self.transfer_data!r}")

    def with_overrides(self, **overrides: Any) -> RunSpec:
        """Apply CLI flags: keys whose value is None are left alone; budget.* keys go to the budget."""
        budget = {k.removeprefix("budget."): v for k, v in overrides.items() if k.startswith("budget.") and v is not None}
        top = {k: v for k, v in overrides.items() if not k.startswith("budget.") and v is not None}
        if isinstance(top.get("budget"), str):  # a preset name: every field, then the budget.* flags on top
            top["budget"] = make_budget(top["budget"])
        spec = dataclasses.replace(self, **top)
        if budget:
            spec = dataclasses.replace(spec, budget=dataclasses.replace(spec.budget, **budget))
        spec.check_types()
        return spec


DTYPES = ("auto", "float32", "bfloat16", "float16")


def read_yaml(path: Path, what: str) -> tuple[Any, dict[str, int]]:
    """A YAML file's data and the line of every mapping key, by dotted path ("budget.lr", "grids[1].tasks").

    A missing file or malformed YAML is a `UserError` naming the file and line.
    """
    if not path.is_file():
        raise UserError(f"{what} file {str(path)!r} does not exist; give the path of a YAML file")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{where}: malformed YAML ({problem}); fix the syntax at that line") from error
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}.{key.value}" if prefix else str(key.value)
                lines[name] = key.start_mark.line + 1
                walk(value, name)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                lines[f"{prefix}[{i}]"] = value.start_mark.line + 1
                walk(value, f"{prefix}[{i}]")

    walk(node, "")
    return data, lines


def make_budget(values: dict[str, Any] | str) -> Budget:
    """A budget from a mapping of fields, a preset name, or a mapping with `preset:` and fields that override it."""
    if isinstance(values, str):
        values = {"preset": values}
    if not isinstance(values, dict):
        raise UserError(f"spec key 'budget' must be a preset name ({', '.join(BUDGET_PRESETS)}) or a mapping "
                        f"(examples:, epochs:, ...), got {values!r}")
    values = dict(values)
    preset = values.pop("preset", None)
    if preset is not None and preset not in BUDGET_PRESETS:
        raise UserError(f"unknown budget preset {preset!r}; presets: {', '.join(BUDGET_PRESETS)}")
    known = {f.name for f in dataclasses.fields(Budget)}
    for key in values:
        if key not in known:
            raise UserError(f"unknown budget key '{key}'; known keys: preset, {', '.join(sorted(known))}")
    return Budget(**{**BUDGET_PRESETS.get(preset, {}), **values})


def _flag(name: str) -> str:
    return name.replace("_", "-")


def cell_key(cell: dict[str, Any]) -> str:
    """Content hash of a cell description (canonical JSON, sorted keys)."""
    blob = json.dumps({"schema": SCHEMA_VERSION, **cell}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


_DIGESTS: dict[tuple, str] = {}


def folder_identity(folder: str | Path) -> str:
    """What identifies a local folder (a model, a data folder) in keys: `<folder name>@<content digest>`, so that a
    copy of the same files under another path (another machine) has the same keys and its stored records are
    found again, and a changed file gives new ones. The digest is SHA-256 over every file's path relative to the
    folder and its bytes (hidden files and `*.partial` left out), computed once per process while no file's size
    or modification time changes (about 2 s per GB). The JSON files of `SERIALIZATION_FIELDS` enter without the
    fields that only say which library version wrote them, so a model saved again by another transformers has the
    same identity when nothing else differs."""
    root = Path(folder).expanduser().resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                   p.relative_to(root).parts) and not p.name.endswith(".partial"))
    stamp = (str(root), *((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _DIGESTS:
        digest = hashlib.sha256()
        for path in files:
            name = path.relative_to(root).as_posix()
            content = _without_serialization_fields(path, SERIALIZATION_FIELDS.get(name, ()))
            size = len(content) if content is not None else path.stat().st_size
            digest.update(f"{name}\0{size}\0".encode())
            if content is not None:
                digest.update(content)
                continue
            with open(path, "rb") as data:
                while chunk := data.read(1 << 24):
                    digest.update(chunk)
        _DIGESTS[stamp] = digest.hexdigest()[:16]
    return f"{root.name}@{_DIGESTS[stamp]}"


SERIALIZATION_FIELDS = {"config.json": ("transformers_version",), "generation_config.json": ("transformers_version",)}
"""Top-level fields of a model folder's JSON files that record the writer's version, not the model."""


def _without_serialization_fields(path: Path, fields: tuple[str, ...]) -> bytes | None:
    """The file as canonical JSON (sorted keys, no spaces) without `fields`; None (its bytes are hashed as they
    are) when it names no fields or is not a JSON object."""
    if not fields:
        return None
    try:
        data = json.loads(path.read_bytes())
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    return json.dumps({k: v for k, v in data.items() if k not in fields}, sort_keys=True,
                      separators=(",", ":")).encode()
