"""The built-in `pico` pair and the made-up world it is pretrained on: pkt-bench's offline embedded default.

The world is a set of facts "<entity> <relation> <value>" over invented words (e.g. "zokabel lives in
inmosqu"). Facts fall into three disjoint groups:

- held-out facts: evaluated by the `probe` task; only the teacher's corpus contains them;
- transfer facts: the transfer data handed to methods (seed, align and train roles); only the teacher's
  corpus contains them;
- common facts: in both corpora, so the student learns the format and the entities.

The teacher (Llama layout, more layers, wider, larger head size) is pretrained on all facts; the student on the
common facts only. A method that raises the student's accuracy on held-out facts above the student's own has
moved knowledge through parameters: the held-out facts exist nowhere else. Everything is deterministic from
`PicoConfig` and cached under `$PKT_BENCH_CACHE` (default `~/.cache/pkt-bench`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

NAMES = {"pico-teacher": "teacher", "pico-student": "student"}
PICO_VERSION = 2
_SYLLABLES = ["ka", "zo", "rim", "bel", "tu", "nar", "qu", "fen", "lo", "dra", "vi", "mos", "xe", "pul", "gor", "sha"]
_RELATIONS = ("lives in", "works as", "likes")


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class PicoConfig:
    """The probe's knobs: the world's size, how facts split, the two model shapes and the pretraining."""

    seed: int = 0
    entities: int = 100
    values_per_relation: int = 40
    held_out_fraction: float = 0.25
    transfer_fraction: float = 0.2
    teacher: ModelShape = ModelShape(layers=4, hidden=128, intermediate=384, heads=4, kv_heads=2)
    student: ModelShape = ModelShape(layers=2, hidden=64, intermediate=192, heads=4, kv_heads=2)
    pretrain_steps: int = 1000
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3

    def digest(self) -> str:
        blob = json.dumps({"version": PICO_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @cached_property
    def world(self) -> World:
        return World.make(self)


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str

    @property
    def prompt(self) -> str:
        return f"{self.entity} {self.relation}"

    @property
    def response(self) -> str:
        return f" {self.value} ."

    @property
    def id(self) -> str:
        return f"{self.entity}|{self.relation}"


@dataclass(frozen=True)
class World:
    held_out: tuple[Fact, ...]
    transfer: tuple[Fact, ...]
    common: tuple[Fact, ...]

    @classmethod
    def make(cls, config: PicoConfig) -> World:
        rng = random.Random(config.seed)
        n_words = config.entities + config.values_per_relation * len(_RELATIONS)
        words: list[str] = []
        seen: set[str] = set()
        while len(words) < n_words:
            word = "".join(rng.choice(_SYLLABLES) for _ in range(3))
            if word not in seen:
                seen.add(word)
                words.append(word)
        entities, value_words = words[: config.entities], words[config.entities :]
        facts = []
        for r, relation in enumerate(_RELATIONS):
            values = value_words[r * config.values_per_relation : (r + 1) * config.values_per_relation]
            # every value used equally often, so guessing the commonest value scores ~1/values_per_relation
            assigned = (values * (config.entities // len(values) + 1))[: config.entities]
            rng.shuffle(assigned)
            facts += [Fact(entity, relation, value) for entity, value in zip(entities, assigned)]
        rng.shuffle(facts)
        n_held = round(len(facts) * config.held_out_fraction)
        n_transfer = round(len(facts) * config.transfer_fraction)
        return cls(tuple(facts[:n_held]), tuple(facts[n_held : n_held + n_transfer]),
                   tuple(facts[n_held + n_transfer :]))

    def corpus(self, which: str) -> list[Fact]:
        return [*self.held_out, *self.transfer, *self.common] if which == "teacher" else list(self.common)

    def words(self) -> list[str]:
        facts = self.corpus("teacher")
        return sorted({word for fact in facts for word in f"{fact.prompt}{fact.response}".split()})


DEFAULT = PicoConfig()


def cache_root() -> Path:
    return Path(os.environ.get("PKT_BENCH_CACHE", Path.home() / ".cache" / "pkt-bench"))


def ensure_built(which: str, config: PicoConfig = DEFAULT) -> Path:
    """The folder of the pico teacher or student, pretraining both on first use (about half a minute on CPU)."""
    folder = cache_root() / f"pico-{config.digest()}"
    if not (folder / "done").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
        try:
            build_pair(config, staging)
            (staging / "done").write_text(config.digest())
            os.replace(staging, folder)  # atomic; if another process won the race, keep its copy
        except OSError:
            if not (folder / "done").exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder / which


def build_tokenizer(words: list[str]):
    """A word-level tokenizer over the world's words, shared by teacher and student."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_pair(config: PicoConfig, out: Path) -> None:
    """Pretrain teacher and student from scratch on their corpora; save both as HF folders under `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    world = config.world
    tokenizer = build_tokenizer(world.words())
    for which, shape in (("teacher", config.teacher), ("student", config.student)):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
            max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        ))
        rows = [tokenizer(fact.prompt + fact.response).input_ids + [tokenizer.eos_token_id]
                for fact in world.corpus(which)]
        width = max(map(len, rows))
        ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        labels = ids.masked_fill(mask == 0, -100)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.pretrain_lr,
                                                       total_steps=config.pretrain_steps, pct_start=0.1)
        draws = torch.Generator().manual_seed(config.seed)
        model.train()
        for _ in range(config.pretrain_steps):  # mini-batches drawn with replacement memorize faster than full batches
            batch = torch.randint(0, len(rows), (config.pretrain_batch,), generator=draws)
            model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        model.save_pretrained(out / which)
        tokenizer.save_pretrained(out / which)
