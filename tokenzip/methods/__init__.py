"""The method registry: one line per method."""

from __future__ import annotations

from ..base import Compressor
from .avg_pool import AvgPool
from .random_prune import RandomPrune

METHODS: list[type[Compressor]] = [
    RandomPrune,
    AvgPool,
]

__all__ = ["METHODS"] + [cls.__name__ for cls in METHODS]
