"""The shared LoRA fine-tuning loop. Every method that fine-tunes calls it (through `TransferContext.finetune`),
so every method gets the same data, steps and schedule under one `Budget`.

Loss is cross-entropy on response tokens only, averaged over all response tokens of an optimizer step (so
gradient accumulation gives the same step as one big batch). A method may pass its own `objective(model, batch)`
returning a loss summed over the micro-batch's response tokens (distillation adds teacher terms); an objective
that is a `torch.nn.Module` (a learned projection) has its trainable parameters in the optimizer too. AdamW,
linear warmup then linear decay, gradient clipping, seeded shuffling. The model is trained in the dtype it was
loaded in (bf16 on CUDA by default); PEFT keeps adapter weights in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import get_linear_schedule_with_warmup

from pkt_bench.api import Example
from pkt_bench.spec import Budget


@dataclass
class TrainStats:
    examples_seen: int
    optimizer_steps: int
    first_loss: float
    last_loss: float


def encode(example: Example, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response (+ EOS) and labels that are -100 on the prompt."""
    prompt = tokenizer(example.prompt).input_ids
    response = tokenizer(example.response, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    labels = ([-100] * len(prompt) + response)[:max_length]
    return ids, labels


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def response_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V] at the N positions that predict a response token, those tokens [N]); the LM head runs on
    those positions only."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state  # [B, T, D]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return causal.get_output_embeddings()(hidden[:, :-1][keep]), targets[keep]


def cross_entropy(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The default objective: next-token cross-entropy summed over the batch's response tokens."""
    logits, targets = response_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def finetune(model, tokenizer, examples: list[Example], budget: Budget, seed: int, objective=None) -> TrainStats:
    """Train the trainable parameters of `model` (and of an `nn.Module` objective) on `examples` under `budget`."""
    assert examples, "the task handed out no train examples"
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    rows = [encode(example, tokenizer, budget.max_length) for example in examples]
    order = torch.Generator().manual_seed(seed)
    micro_batches = [
        [rows[i] for i in perm[start : start + budget.batch_size]]
        for _ in range(budget.epochs)
        for perm in [torch.randperm(len(rows), generator=order).tolist()]
        for start in range(0, len(rows), budget.batch_size)
    ]
    steps = [micro_batches[i : i + budget.grad_accum] for i in range(0, len(micro_batches), budget.grad_accum)]
    assert len(steps) == budget.optimizer_steps(len(rows))

    objective = objective or cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(objective, torch.nn.Module):
        params += [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=budget.lr, weight_decay=budget.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(budget.warmup_ratio * len(steps)), len(steps))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = []
    model.train()
    columns = [TextColumn("fine-tune"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeRemainingColumn()]
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task("fine-tune", total=len(steps), loss="-")
        for group in steps:
            n_tokens = sum(sum(label != -100 for label in labels[1:]) for batch in group for _, labels in batch)
            total = 0.0
            for batch in group:
                inputs = _collate(batch, pad_id, device)
                loss = objective(model, inputs) / max(n_tokens, 1)  # summed over response tokens, / the step's
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, budget.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            progress.update(bar, advance=1, loss=f"{total:.3f}")
    model.eval()
    return TrainStats(examples_seen=len(rows) * budget.epochs, optimizer_steps=len(steps),
                      first_loss=losses[0], last_loss=losses[-1])
