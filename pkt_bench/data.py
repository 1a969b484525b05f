"""Small helpers for transfer data shared by tasks and methods."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def sample(items: Sequence[T], n: int | None, seed: int) -> list[T]:
    """`n` items drawn without replacement with a seeded RNG (all items, shuffled, when n is None or larger)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items if n is None else items[:n]
