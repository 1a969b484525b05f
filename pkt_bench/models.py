"""Teacher/student pairs: resolving names to folders, checking they are one family, loading them.

A model is named by a HF hub id, a local HF folder, or a built-in name (`pico-teacher`, `pico-kin-pruned`, ...:
the in-process models of `pkt_bench.pico`); a pair of them by a built-in pair name (`--pair pico-kin-width`, the
rungs of the probe's kinship ladder). A model folder may hold a `lineage.json` saying which model it was made from
and how (`pkt_bench.pico` writes one into every pico model; `graft` reads it). Loading is transformers' own; this module only decides what to load, on
which device and in which dtype (auto: CUDA with bf16 when present, else CPU with fp32).
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkt_bench.api import UserError
from pkt_bench.spec import folder_identity

LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The per-layer linear matrices of the Llama and Qwen2 layouts: the default targets of LoRA and transfer."""

_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class ModelRef:
    """A model as given (`name`), where transformers loads it from (`path`), and what identifies it in keys
    (`identity`): a hub id as given, a built-in name with its build's digest, a local folder's name with its
    content digest (`spec.folder_identity`: the same on every machine that holds the same files)."""

    name: str
    path: str
    identity: str


def resolve_model(name: str) -> ModelRef:
    """Turn a user's model name into a loadable reference; build the pico pair on first use."""
    from pkt_bench import pico

    if name in pico.NAMES:
        folder = pico.ensure_built(name)
        return ModelRef(name, str(folder), f"{name}@{pico.DEFAULT.digest()}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {name!r} holds no model (no config.json); give a HF model folder or hub id")
        check_weights(path)
        return ModelRef(name, str(path.resolve()), folder_identity(path))
    if path.exists():
        raise UserError(f"model {name!r} is a file, not a folder; give a HF model folder or hub id")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith("/")
    if looks_like_path:
        raise UserError(f"model folder {name!r} does not exist; give an existing HF model folder or a hub id "
                        f"like Qwen/Qwen2.5-0.5B-Instruct")
    return ModelRef(name, name, name)


def check_weights(folder: Path) -> None:
    """Stop before anything runs when a model folder has no weights, or a safetensors file whose header is
    unreadable or promises more bytes than the file holds (a truncated or corrupt download)."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards and not any(folder.glob("pytorch_model*.bin")):
        raise UserError(f"model folder {str(folder)!r} has a config.json but no weights (*.safetensors or "
                        f"pytorch_model*.bin); copy the whole model folder")
    for shard in shards:
        try:
            with shard.open("rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                if size > shard.stat().st_size:
                    raise ValueError("header longer than the file")
                header = json.loads(handle.read(size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            complete = 8 + size + end <= shard.stat().st_size
        except (ValueError, KeyError, TypeError, AttributeError, OSError, MemoryError):
            complete = False
        if not complete:
            raise UserError(f"{shard} is corrupt or truncated (its safetensors header does not match the file); "
                            f"download or copy the model again")


def resolve_pair(name: str) -> tuple[str, str]:
    """(teacher, student) of a built-in pair name; unknown names list the known ones."""
    from pkt_bench import pico

    pairs = {rung.name: rung for rung in pico.LADDER}
    if name not in pairs:
        import difflib

        close = difflib.get_close_matches(name, pairs, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown pair {name!r}; {hint}known pairs: {', '.join(pairs)} (`pkt-bench list pairs`)")
    return pairs[name].teacher, pairs[name].student


def lineage(ref: ModelRef) -> dict[str, Any] | None:
    """The model's `lineage.json` (parent, operation, kept indices), or None when its folder holds none."""
    path = Path(ref.path) / "lineage.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); fix or remove it") from None


def model_config(ref: ModelRef) -> dict[str, Any]:
    local = Path(ref.path) / "config.json"
    if local.is_file():
        try:
            return json.loads(local.read_text())
        except ValueError as error:
            raise UserError(f"{local} is not valid JSON ({error}); restore the model folder's config.json") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref.path).to_dict()
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load model {ref.name!r} ({str(error).splitlines()[0]}); give a local HF folder "
                        f"or check the hub id and network") from None


def _vocab(ref: ModelRef) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref.path).get_vocab()
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the tokenizer of {ref.name!r} ({str(error).splitlines()[0]}); "
                        f"the folder must hold tokenizer files") from None


@functools.cache
def check_family(teacher: ModelRef, student: ModelRef) -> None:
    """Transfer needs one family: the same architecture type and the same vocabulary. A pair that passes is not
    checked again in this process (a sweep plans many cells of one pair; each check loads both tokenizers)."""
    t_type, s_type = model_config(teacher).get("model_type"), model_config(student).get("model_type")
    if t_type != s_type:
        raise UserError(f"teacher {teacher.name!r} ({t_type}) and student {student.name!r} ({s_type}) are of "
                        f"different families; pick a teacher and a student of one model type")
    t_vocab, s_vocab = _vocab(teacher), _vocab(student)
    if t_vocab != s_vocab:
        differ = len(set(t_vocab.items()) ^ set(s_vocab.items()))
        raise UserError(f"teacher {teacher.name!r} and student {student.name!r} have different vocabularies "
                        f"({len(t_vocab)} vs {len(s_vocab)} tokens, {differ} entries differ); pick models that "
                        f"share a tokenizer")


def pick_device(device: str) -> str:
    """`auto` as CUDA when present, else CPU; any other device checked to exist here, before models load."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but this machine has no CUDA device; use --device cpu or auto")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' asked for, but MPS is not available here; use --device cpu or auto")
    return device


def pick_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return _DTYPE_NAMES[dtype]
    return "bfloat16" if device.startswith("cuda") else "float32"


def context_length(ref: ModelRef) -> int | None:
    """The most tokens the model's positions cover (`max_position_embeddings`), when its config says."""
    value = model_config(ref).get("max_position_embeddings")
    return value if isinstance(value, int) else None


def module_names(ref: ModelRef) -> set[str]:
    """The last part of every module's name (`q_proj`, `mlp`, ...), from the config alone (on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ref.path))
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def check_adapter_options(config: Any, models: list[ModelRef]) -> None:
    """LoRA-family options that PEFT would only refuse after reference cells ran: rank, alpha, dropout and
    `target_modules` (each must name modules of every model in `models`)."""
    if isinstance(config.rank, bool) or not config.rank > 0:
        raise UserError(f"-o rank must be a positive integer, got {config.rank!r}; e.g. -o rank=8")
    if not config.alpha > 0:
        raise UserError(f"-o alpha must be positive, got {config.alpha!r}; e.g. -o alpha=16")
    if not 0 <= config.dropout < 1:
        raise UserError(f"-o dropout must be in [0, 1), got {config.dropout!r}")
    if not config.target_modules:
        raise UserError(f"-o target_modules is empty; e.g. -o target_modules=q_proj,v_proj")
    for ref in models:
        names = module_names(ref)
        missing = [m for m in config.target_modules if m not in names]
        if missing:
            close = difflib.get_close_matches(missing[0], sorted(names), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            linear = [m for m in LINEAR_MODULES if m in names]
            raise UserError(f"-o target_modules: {missing[0]!r} is no module of {ref.name!r}; "
                            f"{hint}its linear modules: {', '.join(linear)}")


@dataclass(frozen=True)
class ModelPair:
    """The teacher and the student of a run, with the device and dtype both are loaded in."""

    teacher: ModelRef
    student: ModelRef
    device: str
    dtype: str

    @classmethod
    def resolve(cls, teacher: str, student: str, device: str = "auto", dtype: str = "auto") -> ModelPair:
        pair_t, pair_s = resolve_model(teacher), resolve_model(student)
        check_family(pair_t, pair_s)
        device = pick_device(device)
        return cls(pair_t, pair_s, device, pick_dtype(dtype, device))

    def load(self, which: str) -> tuple[Any, Any]:
        """(model, tokenizer) of "teacher" or "student", on the pair's device and dtype, in eval mode."""
        ref = {"teacher": self.teacher, "student": self.student}[which]
        return load_model(ref.path, self.device, self.dtype)


def load_model(path: str, device: str, dtype: str, adapter: str | None = None) -> tuple[Any, Any]:
    """A HF causal LM and its tokenizer; with `adapter`, the PEFT adapter at that folder merged in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(adapter if adapter and _has_tokenizer(adapter) else path)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
