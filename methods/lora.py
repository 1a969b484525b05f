"""LoRA on the student with no teacher: the controls every PKT method must beat (same data, budget and loop).

`lora` uses PEFT's default initialization (B = 0). `pissa` is the same with PEFT's PiSSA initialization: the
adapter starts at the student's own top-r singular vectors and PEFT replaces the base weight with the residual,
so the step-0 function is unchanged; the artifact is then the merged model, since the adapter alone does not
apply to the original base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pkt_bench.api import Artifact, TransferContext
from pkt_bench.models import LINEAR_MODULES, check_adapter_options
from pkt_bench.registry import register_method



@dataclass
class LoRAConfig:
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input during training"})
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_MODULES),
                                      metadata={"help": "module names that get an adapter (comma-separated on the CLI)"})
    init: str = field(default="default", metadata={"help": "PEFT's init_lora_weights: default (B = 0), gaussian, "
                                                           "pissa, pissa_niter_N, olora, ..."})

    @property
    def keeps_base(self) -> bool:
        """Whether the init leaves the base weights alone, so that the adapter applies to the original student."""
        return self.init in ("default", "gaussian")


@register_method("lora")
@register_method("pissa", init="pissa", reference="https://arxiv.org/abs/2404.02948",
                 description="PiSSA: LoRA initialized from the student's own principal components (A, B from its top "
                             "singular vectors, the residual as the frozen base), same budget; no teacher")
class LoRA:
    description = "vanilla LoRA fine-tuning of the student (PEFT default init), no teacher"
    reference = "https://arxiv.org/abs/2106.09685"
    Config = LoRAConfig
    fine_tunes = True

    def __init__(self, config: LoRAConfig):
        self.config = config

    def check(self, pair) -> None:
        check_adapter_options(self.config, [pair.student])

    def transfer(self, ctx: TransferContext) -> Artifact:
        model, tokenizer = self.initialize(ctx)
        ctx.finetune(model, tokenizer)
        return self.save(ctx, model, tokenizer)

    def save(self, ctx: TransferContext, model, tokenizer) -> Artifact:
        """The adapter when the base is the student's own, else the merged model."""
        if self.config.keeps_base:
            return ctx.save_adapter(model, tokenizer)
        return ctx.save_merged(model, tokenizer)

    def initialize(self, ctx: TransferContext):
        """The student's PEFT model at step 0, and its tokenizer."""
        from peft import LoraConfig, get_peft_model

        model, tokenizer = ctx.pair.load("student")
        c = self.config
        init = True if c.init == "default" else c.init
        return get_peft_model(model, LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                                target_modules=list(c.target_modules), init_lora_weights=init,
                                                task_type="CAUSAL_LM")), tokenizer
