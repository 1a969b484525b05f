"""An example method plugin: LoRA on the attention projections only.

    pkt-bench run --plugin examples/attention_lora.py --method attention-lora
"""

from dataclasses import dataclass, field

from pkt_bench.api import Artifact, TransferContext
from pkt_bench.registry import register_method


@dataclass
class AttentionLoRAConfig:
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})


@register_method("attention-lora")
class AttentionLoRA:
    description = "LoRA on q/k/v/o only (example plugin)"
    reference = "https://arxiv.org/abs/2106.09685"
    Config = AttentionLoRAConfig
    fine_tunes = True  # uses the shared loop, so the run's budget applies

    def __init__(self, config: AttentionLoRAConfig):
        self.config = config

    def transfer(self, ctx: TransferContext) -> Artifact:
        from peft import LoraConfig, get_peft_model  # heavy imports inside: `pkt-bench list` stays fast

        model, tokenizer = ctx.pair.load("student")
        adapter = LoraConfig(r=self.config.rank, lora_alpha=2 * self.config.rank, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = get_peft_model(model, adapter)
        ctx.finetune(model, tokenizer)
        return ctx.save_adapter(model, tokenizer)
