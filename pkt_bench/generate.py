"""Generation backends behind the `Generator` protocol: greedy continuations cut at the first stop sequence.

- `HFGenerator`: transformers' `generate`, batched with left padding; the stop sequences stop each row as it
  produces one (transformers' `StopStringCriteria`), so a batch ends as soon as every row has. A tokenizer that
  criterion cannot read (a closed word-level vocabulary like the pico pair's) generates to `max_new_tokens` and
  is cut afterwards.
- `VLLMGenerator`: vLLM's `LLM.generate` with greedy sampling params, optionally under a LoRA request.

lm-eval tasks generate through lm-eval's own model classes (see `pkt_bench.evaluate`); these serve the tasks
that prompt a model directly (the probe) and `benchmarks/generation.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class HFGenerator:
    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        import torch
        from transformers import GenerationConfig

        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        stop = [s for s in stop if s]
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
        criteria = _stop_criteria(tokenizer, stop)
        device = next(self.model.parameters()).device
        # longest first, so padding stays small within each batch; outputs go back in the callers' order
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                tokens = self.model.generate(**batch, generation_config=config, stopping_criteria=criteria)
            texts = tokenizer.batch_decode(tokens[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                outputs[i] = cut_at_stop(text, stop)
        return outputs


def _stop_criteria(tokenizer, stop: list[str]):
    """Per-row stop-string criteria for `generate`, or None without stops or for a tokenizer it cannot read."""
    from transformers import StopStringCriteria, StoppingCriteriaList

    if not stop:
        return None
    try:
        return StoppingCriteriaList([StopStringCriteria(tokenizer, stop)])
    except ValueError:  # its vocabulary table needs a tokenizer that can spell any text
        return None


class VLLMGenerator:
    name = "vllm"

    def __init__(self, llm, lora_request: Any = None):
        self.llm, self.lora_request = llm, lora_request

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=[s for s in stop if s] or None)
        outputs = self.llm.generate(list(prompts), params, lora_request=self.lora_request, use_tqdm=False)
        return [cut_at_stop(output.outputs[0].text, stop) for output in outputs]
