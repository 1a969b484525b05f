"""The shared LoRA fine-tuning loop. Every method that fine-tunes calls it (through `TransferContext.finetune`),
so every method gets the same data, steps and schedule under one `Budget`.

Loss is cross-entropy on response tokens only, averaged over all response tokens of an optimizer step (so
gradient accumulation gives the same step as one big batch). A method may pass its own `objective(model, batch)`
returning a loss summed over the micro-batch's response tokens (distillation adds teacher terms); an objective
that is a `torch.nn.Module` (a learned projection) has its trainable parameters in the optimizer too. AdamW,
linear warmup then linear decay (or a constant rate: `Budget.schedule`), gradient clipping, seeded shuffling. The
model is trained in the dtype it was loaded in (bf16 on CUDA by default); PEFT keeps adapter weights in fp32.

Memory: the LM head runs only at the positions that predict a response token, and the default loss takes its
cross-entropy over those in chunks of `LOSS_CHUNK` tokens, each recomputed in the backward pass, so no
[batch, length, vocab] block (152k columns for Qwen2.5) is ever held. Budget options trade speed for memory
without changing the maths: `autocast` (bf16 matmuls over fp32 weights), `group_by_length` (micro-batches of
similar lengths, so padding does not dominate) and `gradient_checkpointing` (the decoder's activations
recomputed in the backward pass).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from pkt_bench.api import Example
from pkt_bench.spec import Budget

LOSS_CHUNK = 1024
"""Response tokens per chunk of the default loss: the LM head's output is [LOSS_CHUNK, vocab] at a time."""

Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
"""`objective(model, batch)`: the loss SUMMED over the micro-batch's response tokens (the loop divides by the
optimizer step's response-token count)."""


@dataclass
class TrainStats:
    examples_seen: int
    optimizer_steps: int
    first_loss: float
    last_loss: float
    autocast: str = "off"
    gradient_checkpointing: bool = False
    losses: list[float] = field(default_factory=list)  # each optimizer step's mean loss per response token
    validation_loss_before: float | None = None  # mean cross-entropy per response token on validation examples
    validation_loss_after: float | None = None
    validation_examples: int = 0


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


def response_hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states at the positions that predict a response token [N, d] and those tokens [N].

    Llama/Qwen2-style models only: logits are `get_output_embeddings()(hidden)`, with no scaling or soft-capping.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state  # [B, T, d]
    keep = response_positions(batch)
    return hidden[keep], batch["labels"][:, 1:][keep[:, :-1]]


def response_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T] bool: the *supervised positions*, those whose next token is a response token (position t predicts
    token t + 1), in the order `response_hidden` returns them."""
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = batch["labels"][:, 1:] != -100
    return keep


def response_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a response token [N, vocab] and those tokens [N] (for objectives that
    need the whole distribution, e.g. distillation against a teacher's logits)."""
    hidden, targets = response_hidden(model, batch)
    return model.get_output_embeddings()(hidden), targets


def _summed_ce(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def response_ce(model, batch: dict[str, torch.Tensor], chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """The default objective: next-token cross-entropy summed over the response tokens, `chunk` tokens of logits
    at a time (each chunk's logits are recomputed in the backward pass instead of kept)."""
    from torch.utils.checkpoint import checkpoint

    hidden, targets = response_hidden(model, batch)
    head = model.get_output_embeddings()
    total = hidden.sum() * 0.0  # keeps the graph when no response token survived truncation
    for start in range(0, len(targets), chunk):
        total = total + checkpoint(_summed_ce, head, hidden[start : start + chunk], targets[start : start + chunk],
                                   use_reentrant=False)
    return total


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast is faster than fp32."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = info.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_autocast(setting: str, model) -> str:
    """The autocast the loop uses: "bf16" or "off" ("auto": bf16 for an fp32 model on a CPU with bf16 instructions)."""
    if setting != "auto":
        return setting
    param = next(model.parameters())
    return "bf16" if param.device.type == "cpu" and param.dtype == torch.float32 and cpu_has_bf16() else "off"


def micro_batches(rows: list[tuple[list[int], list[int]]], budget: Budget, seed: int) -> list[list]:
    """The micro-batches of all epochs: a seeded permutation per epoch, cut into `batch_size` rows. With
    `group_by_length`, each window of 16 batches of the permutation is sorted by length before it is cut, and the
    epoch's batches are then shuffled (as transformers' `group_by_length` does), so rows of a batch pad little."""
    order = torch.Generator().manual_seed(seed)
    size, batches = budget.batch_size, []
    for _ in range(budget.epochs):
        perm = torch.randperm(len(rows), generator=order).tolist()
        if not budget.group_by_length:
            batches += [[rows[i] for i in perm[start : start + size]] for start in range(0, len(perm), size)]
            continue
        window = 16 * size
        perm = [i for start in range(0, len(perm), window)
                for i in sorted(perm[start : start + window], key=lambda i: -len(rows[i][0]))]
        epoch = [[rows[i] for i in perm[start : start + size]] for start in range(0, len(perm), size)]
        batches += [epoch[i] for i in torch.randperm(len(epoch), generator=order).tolist()]
    return batches


def validation_loss(model, tokenizer, examples: list[Example], budget: Budget) -> float | None:
    """Mean cross-entropy per response token of `examples` (micro-batches of the budget's size, no gradient);
    None without examples."""
    if not examples:
        return None
    device = next(model.parameters()).device
    rows = sorted((encode(example, tokenizer, budget.max_length) for example in examples), key=lambda r: len(r[0]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), budget.batch_size):
            batch = rows[start : start + budget.batch_size]
            total += response_ce(model, _collate(batch, pad_id, device)).item()
            tokens += sum(sum(label != -100 for label in labels[1:]) for _, labels in batch)
    model.train(was_training)
    return round(total / max(tokens, 1), 6)


def finetune(model, tokenizer, examples: list[Example], budget: Budget, seed: int,
             objective: Objective | None = None, validation: list[Example] | None = None) -> TrainStats:
    """Train the trainable parameters of `model` on `examples` under `budget`; `objective` replaces the default
    response cross-entropy (`response_ce`). The response cross-entropy of `validation` examples is measured
    before and after training."""
    assert examples, "the task handed out no train examples"
    objective = objective or response_ce
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    before = validation_loss(model, tokenizer, validation or [], budget)
    rows = [encode(example, tokenizer, budget.max_length) for example in examples]
    batches = micro_batches(rows, budget, seed)
    steps = [batches[i : i + budget.grad_accum] for i in range(0, len(batches), budget.grad_accum)]
    assert len(steps) == budget.optimizer_steps(len(rows))

    autocast = resolve_autocast(budget.autocast, model)
    precision = (torch.autocast(device.type, dtype=torch.bfloat16) if autocast == "bf16"
                 else contextlib.nullcontext())
    if budget.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(objective, torch.nn.Module):
        params += [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=budget.lr, weight_decay=budget.weight_decay)
    warmup = math.ceil(budget.warmup_ratio * len(steps))
    schedule = (get_linear_schedule_with_warmup(optimizer, warmup, len(steps)) if budget.schedule == "linear"
                else get_constant_schedule_with_warmup(optimizer, warmup))
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
                with precision:
                    loss = objective(model, _collate(batch, pad_id, device)) / max(n_tokens, 1)
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, budget.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            progress.update(bar, advance=1, loss=f"{total:.3f}")
    if budget.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return TrainStats(examples_seen=len(rows) * budget.epochs, optimizer_steps=len(steps),
                      first_loss=losses[0], last_loss=losses[-1], autocast=autocast,
                      gradient_checkpointing=budget.gradient_checkpointing, losses=[round(x, 6) for x in losses],
                      validation_loss_before=before,
                      validation_loss_after=validation_loss(model, tokenizer, validation or [], budget),
                      validation_examples=len(validation or []))
