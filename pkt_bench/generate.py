"""Generation backends. `hf`: transformers' `generate`, batched with left padding, greedy.

(The `vllm` backend comes with the real tasks.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class HFGenerator:
    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
        device = next(self.model.parameters()).device
        # longest first, so padding stays small within each batch; outputs go back in the callers' order
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(device)
            tokens = self.model.generate(**batch, generation_config=config)
            texts = tokenizer.batch_decode(tokens[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                outputs[i] = cut_at_stop(text, stop)
        return outputs
