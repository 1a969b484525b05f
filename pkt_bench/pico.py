"""The built-in pico models and the made-up world they are pretrained on: pkt-bench's offline embedded default.

The world is a set of facts "<entity> <relation> <value>" over invented words (e.g. "zokabel lives in
inmosqu"). Facts fall into three disjoint groups:

- held-out facts: evaluated by the `probe` task; only a (kin) teacher's corpus contains them;
- transfer facts: the transfer data handed to methods (seed, align and train roles);
- common facts: in every corpus, so each model learns the format and the entities.

From this one world come the models of the *kinship ladder*, pairs whose teacher and student are ever less
related (the probe's README explains why):

- `pico-kin-ancestor` (teacher's shape): pretrained on the common facts only;
- `pico-kin-teacher`: the ancestor trained further on all facts;
- `pico-sham-teacher` (negative control): the ancestor trained further on transfer and common facts only;
- students that never see a held-out fact, each continued from the ancestor on the common facts:
  `pico-kin-same` (teacher's shape), `pico-kin-depth` (a deep layer dropped), `pico-kin-width` (hidden size, head
  dims and FFN cut), `pico-kin-pruned` (both cuts: the shape of `pico-student`), the pruned ones *healed* (trained
  briefly) after the cut;
- `pico-teacher` / `pico-student`: pretrained independently from scratch on all / the common facts.

Every model folder holds a `lineage.json`: the model it came from (`parent`, and its folder relative to this one,
`parent_path`), the operation, the corpus and steps, and the ancestor indices it kept in each dimension (`kept`). Everything is deterministic from
`PicoConfig`; each model is built on first use (with the models it comes from) and cached under
`$PKT_BENCH_CACHE` (default `~/.cache/pkt-bench`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pkt_bench.api import UserError

PICO_VERSION = 3
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
    """The probe's knobs: the world's size, how facts split, the two model shapes and the training."""

    seed: int = 0
    entities: int = 200
    values_per_relation: int = 40
    held_out_fraction: float = 0.4
    transfer_fraction: float = 0.2
    teacher: ModelShape = ModelShape(layers=4, hidden=128, intermediate=384, heads=4, kv_heads=2)
    student: ModelShape = ModelShape(layers=2, hidden=64, intermediate=192, heads=4, kv_heads=2)
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    continue_steps: int = 400
    continue_lr: float = 1e-3
    kin_depth_layers: int = 3  # pico-kin-depth's layers (pico-kin-pruned has the student's)

    def digest(self) -> str:
        blob = json.dumps({"version": PICO_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @cached_property
    def world(self) -> World:
        return World.make(self)

    @property
    def chance(self) -> float:
        """Accuracy of guessing a value of the right relation: every value is used equally often."""
        return 1 / self.values_per_relation


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


CORPORA = ("all", "sham", "common")
"""all: every fact (teachers); sham: transfer and common facts (the sham teacher); common: students and ancestor."""


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
        groups = {"all": (self.held_out, self.transfer, self.common), "sham": (self.transfer, self.common),
                  "common": (self.common,)}[which]
        return [fact for group in groups for fact in group]

    def words(self) -> list[str]:
        facts = self.corpus("all")
        return sorted({word for fact in facts for word in f"{fact.prompt}{fact.response}".split()})


@dataclass(frozen=True)
class Recipe:
    """How a pico model is made: from scratch (`parent` None) in `shape`, or from `parent`, optionally pruned."""

    describe: str
    corpus: str
    parent: str | None = None
    shape: str = "teacher"  # from scratch: "teacher" or "student" of PicoConfig
    prune: tuple[str, ...] = ()  # cuts applied to the parent before training: "depth", "width"


RECIPES = {
    "pico-teacher": Recipe("teacher pretrained from scratch on all facts", "all"),
    "pico-student": Recipe("student pretrained from scratch on the common facts (never a held-out fact)", "common",
                           shape="student"),
    "pico-kin-ancestor": Recipe("the kin models' ancestor (teacher's shape), pretrained on the common facts",
                                "common"),
    "pico-kin-teacher": Recipe("the ancestor trained further on all facts", "all", "pico-kin-ancestor"),
    "pico-sham-teacher": Recipe("negative control: the ancestor trained further on transfer and common facts "
                                "only (no held-out fact)", "sham", "pico-kin-ancestor"),
    "pico-kin-same": Recipe("the ancestor trained further on the common facts (teacher's shape)", "common",
                            "pico-kin-ancestor"),
    "pico-kin-depth": Recipe("the ancestor with a deep layer dropped, healed on the common facts", "common",
                             "pico-kin-ancestor", prune=("depth",)),
    "pico-kin-width": Recipe("the ancestor with hidden size, head dims and FFN halved, healed on the common facts",
                             "common", "pico-kin-ancestor", prune=("width",)),
    "pico-kin-pruned": Recipe("the ancestor cut in depth and width (pico-student's shape), healed on the common "
                              "facts", "common", "pico-kin-ancestor", prune=("depth", "width")),
}
NAMES = tuple(RECIPES)


@dataclass(frozen=True)
class Rung:
    name: str
    teacher: str
    student: str
    varies: str


LADDER = (
    Rung("pico-kin-same", "pico-kin-teacher", "pico-kin-same", "one ancestor, same shape: the easiest transfer"),
    Rung("pico-kin-depth", "pico-kin-teacher", "pico-kin-depth", "one ancestor; the student lost a deep layer"),
    Rung("pico-kin-width", "pico-kin-teacher", "pico-kin-width", "one ancestor; the student has half the width"),
    Rung("pico-kin-pruned", "pico-kin-teacher", "pico-kin-pruned", "one ancestor; half the layers and the width"),
    Rung("pico-kin-sham", "pico-sham-teacher", "pico-kin-same", "negative control: no held-out fact in the teacher"),
    Rung("pico", "pico-teacher", "pico-student", "no common ancestor (the default pair)"),
)
"""The built-in pairs (`--pair NAME`), most related first."""

DEFAULT = PicoConfig()


def cache_root() -> Path:
    return Path(os.environ.get("PKT_BENCH_CACHE", Path.home() / ".cache" / "pkt-bench"))


def folder_name(name: str) -> str:
    """A model's folder inside the config's cache folder: `teacher`, `student`, `kin-same`, ..."""
    return name.removeprefix("pico-")


def ensure_built(name: str, config: PicoConfig = DEFAULT) -> Path:
    """The folder of the pico model `name` ("teacher"/"student" mean pico-teacher/pico-student), building it and
    the models it comes from on first use. A lock makes concurrent first runs build each model once; a model is
    built in a `.building-*` folder that is renamed into place when complete, or removed if the build stops."""
    name = {"teacher": "pico-teacher", "student": "pico-student"}.get(name, name)
    assert name in RECIPES, f"unknown pico model {name!r}"
    root = cache_root() / f"pico-{config.digest()}"
    target = root / folder_name(name)
    if (target / "lineage.json").is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        return _build_in(name, config, root, target)
    except PermissionError as error:
        raise UserError(f"cannot build {name} in the model cache {root.parent} ({error.strerror}: {error.filename}); "
                        f"make it writable or set PKT_BENCH_CACHE to a writable folder") from None


def _build_in(name: str, config: PicoConfig, root: Path, target: Path) -> Path:
    with _lock(root.parent / f"{root.name}.lock"), _terminate_cleanly():
        recipe = RECIPES[name]
        if recipe.parent:
            ensure_built(recipe.parent, config)
        if not (target / "lineage.json").is_file():
            staging = Path(tempfile.mkdtemp(dir=root, prefix=f".building-{folder_name(name)}-"))
            try:
                build_model(name, config, staging)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes (re-entrant within this process: builds nest)."""
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0
            fcntl.flock(handle, fcntl.LOCK_UN)


_held = threading.local()


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Let SIGTERM unwind the stack (so `finally` removes the staging folder) instead of killing at once."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
            signal.SIG_DFL, None):
        yield
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def build_tokenizer(words: list[str]):
    """A word-level tokenizer over the world's words, shared by every pico model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_model(name: str, config: PicoConfig, out: Path) -> None:
    """Make the model `name` by its recipe (its parent already built) and save it, with its lineage, to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from pkt_bench.pruning import Kept, choose, prune

    recipe = RECIPES[name]
    tokenizer = build_tokenizer(config.world.words())
    lineage: dict[str, Any] = {"name": name, "describe": recipe.describe, "pico": config.digest(),
                               "corpus": recipe.corpus, "parent": recipe.parent,
                               "parent_path": f"../{folder_name(recipe.parent)}" if recipe.parent else None}
    torch.manual_seed(config.seed)
    if recipe.parent is None:
        shape = getattr(config, recipe.shape)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
            max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        ))
        steps, lr, lineage["operation"] = config.pretrain_steps, config.pretrain_lr, "pretrain"
    else:
        model = AutoModelForCausalLM.from_pretrained(ensure_built(recipe.parent, config), dtype=torch.float32)
        if recipe.prune:
            depth = config.student.layers if "width" in recipe.prune else config.kin_depth_layers
            kept = choose(model, depth if "depth" in recipe.prune else None,
                          config.student if "width" in recipe.prune else None)
            model = prune(model, kept)
            lineage["kept"] = kept.to_json()
        else:
            lineage["kept"] = Kept.everything(model.config).to_json()
        steps, lr = config.continue_steps, config.continue_lr
        lineage["operation"] = ("prune " + "+".join(recipe.prune) + ", then heal") if recipe.prune else "continue"
    lineage.update(steps=steps, lr=lr, batch=config.pretrain_batch)
    train(model, tokenizer, config.world.corpus(recipe.corpus), steps, lr, config, f"building {name}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "lineage.json").write_text(json.dumps(lineage, indent=1))


def train(model, tokenizer, facts: list[Fact], steps: int, lr: float, config: PicoConfig, label: str) -> None:
    """Next-token training on the facts: AdamW with one-cycle, mini-batches drawn with replacement (they
    memorize faster than full batches), a progress bar on stderr."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    rows = [tokenizer(fact.prompt + fact.response).input_ids + [tokenizer.eos_token_id] for fact in facts]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    draws = torch.Generator().manual_seed(config.seed)
    model.train()
    console = Console(stderr=True)
    started = time.perf_counter()
    with Progress(TextColumn(f"pkt-bench: {label} (once; cached in {cache_root()})"), BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True) as progress:
        bar = progress.add_task(label, total=steps)
        for step in range(steps):
            if not console.is_terminal and step and step % (steps // 10 or 1) == 0:  # a log file: a line per 10%
                console.print(f"pkt-bench: {label}: {step}/{steps} steps, {time.perf_counter() - started:.0f} s")
            batch = torch.randint(0, len(rows), (config.pretrain_batch,), generator=draws)
            model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            progress.advance(bar)
    console.print(f"pkt-bench: built {label.removeprefix('building ')} ({steps} steps, "
                  f"{time.perf_counter() - started:.0f} s), cached in {cache_root()}")
    model.eval()
