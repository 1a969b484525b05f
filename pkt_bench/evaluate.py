"""Evaluation targets: an artifact with lazily loaded views (model and tokenizer, a generator) for tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pkt_bench.api import Artifact, Generator, UserError

BACKENDS = ("hf",)


@dataclass
class HFTarget:
    """An artifact loaded with transformers (adapters merged in) on the run's device and dtype."""

    artifact: Artifact
    device: str
    dtype: str
    batch_size: int = 32
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


def make_target(artifact: Artifact, backend: str, device: str, dtype: str) -> HFTarget:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    return HFTarget(artifact, device, dtype)
