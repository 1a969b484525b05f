"""Baselines without transfer: the student or the teacher, evaluated as they are."""

from __future__ import annotations

from dataclasses import dataclass, field

from pkt_bench.api import Artifact, TransferContext, UserError
from pkt_bench.registry import register_method


@dataclass
class AsIsConfig:
    which: str = field(default="student", metadata={"help": "which model of the pair to evaluate: student or teacher"})

    def __post_init__(self) -> None:
        if self.which not in ("student", "teacher"):
            raise UserError(f"option 'which' must be student or teacher, got {self.which!r}")


@register_method("student", description="the student evaluated as is (the floor every transfer must beat)")
@register_method("teacher", description="the teacher evaluated as is (the reference ceiling)", which="teacher")
class AsIs:
    """Evaluate one model of the pair unchanged."""

    description = "a model of the pair evaluated as is"
    reference = ""
    Config = AsIsConfig
    fine_tunes = False
    uses_transfer_data = False  # so the transfer format is no part of its cell: one reference for all formats
    seeded = False  # nothing random: one evaluation (at seed 0) serves the records of every seed

    def __init__(self, config: AsIsConfig):
        self.config = config

    def transfer(self, ctx: TransferContext) -> Artifact:
        ref = ctx.pair.teacher if self.config.which == "teacher" else ctx.pair.student
        return Artifact(kind="model", path=ref.path)
