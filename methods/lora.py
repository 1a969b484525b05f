"""Vanilla LoRA: the student fine-tuned with PEFT's default initialization (B = 0), no teacher involved.

The control every PKT method must beat: same data, same budget, same loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pkt_bench.api import Artifact, TransferContext
from pkt_bench.models import LINEAR_MODULES
from pkt_bench.registry import register_method



@dataclass
class LoRAConfig:
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input during training"})
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_MODULES),
                                      metadata={"help": "module names that get an adapter (comma-separated on the CLI)"})


@register_method("lora")
class LoRA:
    description = "vanilla LoRA fine-tuning of the student (PEFT default init), no teacher"
    reference = "https://arxiv.org/abs/2106.09685"
    Config = LoRAConfig
    fine_tunes = True

    def __init__(self, config: LoRAConfig):
        self.config = config

    def transfer(self, ctx: TransferContext) -> Artifact:
        from peft import LoraConfig, get_peft_model

        model, tokenizer = ctx.pair.load("student")
        c = self.config
        model = get_peft_model(model, LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                                 target_modules=list(c.target_modules), task_type="CAUSAL_LM"))
        ctx.finetune(model, tokenizer)
        return ctx.save_adapter(model, tokenizer)
