"""Sensitivity scores S = Σ over seed samples |θ ⊙ ∂L/∂θ|, one decoder layer at a time, and their file."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from pkt_bench.api import UserError

_LAYER = re.compile(r"\blayers\.(\d+)\.(?:.*\.)?(\w+)\.weight$")
EMBEDDINGS = ("embed_tokens", "lm_head")


def matrix_key(name: str) -> tuple[int | None, str] | None:
    """(layer index, module name) of a weight's parameter name; (None, name) for embeddings; None otherwise."""
    match = _LAYER.search(name)
    if match:
        return int(match.group(1)), match.group(2)
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return (None, module) if module in EMBEDDINGS else None


def sensitivity(model, tokenizer, seeds, max_length: int, targeted: Callable[[str], bool],
                layer_totals: list[float]) -> Iterator[tuple[str, object]]:
    """Yield (parameter name, S) for each targeted parameter once its S = Σ_seeds |θ ⊙ ∂L/∂θ| is complete.

    Works one decoder layer at a time (see the module docstring). `layer_totals[l]` receives the summed
    sensitivity of every parameter of layer l. Embeddings (untied or tied) are scored when targeted.
    """
    import torch

    from pkt_bench.finetune import encode

    decoder, head, embed = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(p): n for n, p in model.named_parameters()}
    device = head.weight.device
    inputs = [[] for _ in seeds]  # [seed][layer] -> (hidden input, kwargs, other positional args)
    finals, batches = [], []
    model.requires_grad_(False)
    tied = head.weight is embed.weight
    embed_scores = {}  # parameter -> fp32 buffer of the targeted embedding matrices
    for param in {id(head.weight): head.weight, id(embed.weight): embed.weight}.values():
        if targeted(names[id(param)]):
            embed_scores[param] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)

    def capture(module, args, kwargs, store):
        hidden = args[0] if args else kwargs["hidden_states"]
        store.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}, args[1:]))

    with torch.no_grad():
        for k, example in enumerate(seeds):
            ids, labels = encode(example, tokenizer, max_length)
            batches.append((torch.tensor([ids], device=device), torch.tensor([labels], device=device)))
            hooks = [layer.register_forward_pre_hook(lambda m, a, kw, s=inputs[k]: capture(m, a, kw, s),
                                                     with_kwargs=True) for layer in decoder.layers]
            hooks.append(decoder.norm.register_forward_pre_hook(lambda m, a, kw: finals.append(a[0] if a else
                                                                                                kw["hidden_states"]),
                                                                with_kwargs=True))
            try:
                decoder(input_ids=batches[-1][0], use_cache=False)
            finally:
                for hook in hooks:
                    hook.remove()
            if embed.weight in embed_scores and not torch.equal(embed(batches[-1][0]), inputs[k][0][0]):
                raise UserError("cannot score embed_tokens of this model: its first layer does not take the "
                                "embeddings as they are; set embeddings=false")

    def fold(params, grads, buffers, total):
        for param, grad in zip(params, grads):
            score = (param.detach().float() * grad.float()).abs_()
            if param in buffers:
                buffers[param].add_(score)
            else:
                total[0] += float(score.sum(dtype=torch.float64))

    grads, head_rows = [], []  # per seed: ∂L/∂(current layer's output); tied: the head's gradient on its tokens
    for (ids, labels), final in zip(batches, finals):
        hidden = final.detach().requires_grad_(True)
        wrt = [hidden] + ([head.weight] if head.weight in embed_scores else [])
        with torch.enable_grad():
            head.weight.requires_grad_(len(wrt) > 1)
            logits = head(decoder.norm(hidden)).float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
            result = torch.autograd.grad(loss, wrt)
            head.weight.requires_grad_(False)
        grads.append(result[0])
        if len(result) > 1:
            fold([head.weight], result[1:], embed_scores, [0.0])
            if tied:
                head_rows.append(result[1][ids[0].unique()])
    if head.weight in embed_scores and not tied:
        yield names[id(head.weight)], embed_scores.pop(head.weight)

    for index in reversed(range(len(decoder.layers))):
        layer = decoder.layers[index]
        params = [p for p in layer.parameters()]
        buffers = {p: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params
                   if targeted(names[id(p)])}
        total = [0.0]
        for k in range(len(seeds)):
            hidden, kwargs, rest = inputs[k][index]
            inputs[k][index] = None
            hidden = hidden.detach().requires_grad_(True)
            with torch.enable_grad():
                layer.requires_grad_(True)
                out = layer(hidden, *rest, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                result = torch.autograd.grad(out, [hidden, *params], grads[k])
                layer.requires_grad_(False)
            grads[k] = result[0]
            fold(params, result[1:], buffers, total)
        layer_totals[index] = total[0] + sum(float(b.sum(dtype=torch.float64)) for b in buffers.values())
        for param, score in buffers.items():
            yield names[id(param)], score
        del buffers

    if embed.weight in embed_scores:
        score, weight = embed_scores.pop(embed.weight), embed.weight
        for k, (ids, _) in enumerate(batches):
            with torch.enable_grad():
                weight.requires_grad_(True)
                (grad,) = torch.autograd.grad(embed(ids), weight, grads[k])
                weight.requires_grad_(False)
            if tied:  # per sample the gradient is head's + embedding's: redo |θ·g| on this sample's token rows
                rows = ids[0].unique()
                w = weight.detach()[rows].float()
                score[rows] += (w * (head_rows[k] + grad[rows]).float()).abs() - (w * head_rows[k].float()).abs()
            else:
                fold([weight], [grad], {weight: score}, [0.0])
        yield names[id(weight)], score


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, so scores never need to be in memory together.

    safetensors (0.8) saves only complete dicts; its format is an 8-byte header length, a JSON header with each
    tensor's dtype, shape and byte range, then the bytes. Every tensor must be written once before `close`.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]):
        import math

        header, offset = {}, 0
        for name, shape in shapes.items():
            size = 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.start, self.header, self.pending = 8 + len(text), header, set(header)
        self.file = path.open("wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.file.truncate(self.start + offset)

    def write(self, name: str, tensor) -> None:
        self.file.seek(self.start + self.header[name]["data_offsets"][0])
        self.file.write(tensor.detach().float().contiguous().cpu().numpy().tobytes())
        self.pending.discard(name)

    def close(self) -> None:
        self.file.close()
        assert not self.pending, f"scores never written: {sorted(self.pending)}"
