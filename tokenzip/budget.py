"""Token budgets: how many tokens of one item (image, clip, ...) reach the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """Exactly one of ``retain`` (fraction, 0 < r <= 1) or ``tokens`` (count, >= 1).

    For an item of ``N`` tokens, ``retain=r`` keeps ``max(1, floor(r * N + 0.5))`` tokens (round half up) and
    ``tokens=k`` keeps ``min(k, N)``. ``N`` is the number of that item's tokens that would reach the LLM.
    """

    retain: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.retain is None) == (self.tokens is None):
            raise ValueError(
                "give exactly one budget: retain=<fraction in (0, 1]> or tokens=<int >= 1> "
                f"(got retain={self.retain!r}, tokens={self.tokens!r})"
            )
        if self.retain is not None:
            if isinstance(self.retain, bool) or not isinstance(self.retain, (int, float)):
                raise TypeError(f"retain must be a float in (0, 1], got {type(self.retain).__name__}")
            if not (0.0 < float(self.retain) <= 1.0) or math.isnan(float(self.retain)):
                raise ValueError(f"retain must be in (0, 1], got {self.retain!r}")
        if self.tokens is not None:
            if isinstance(self.tokens, bool) or not isinstance(self.tokens, int):
                raise TypeError(f"tokens must be an int >= 1, got {type(self.tokens).__name__}")
            if self.tokens < 1:
                raise ValueError(f"tokens must be >= 1, got {self.tokens!r}")

    def count(self, n: int) -> int:
        """Tokens to keep out of ``n``."""
        if n <= 0:
            return 0
        if self.tokens is not None:
            return min(self.tokens, n)
        return max(1, min(n, math.floor(float(self.retain) * n + 0.5)))

    def is_identity(self, n: int) -> bool:
        return self.count(n) >= n

    def __str__(self) -> str:
        return f"retain={self.retain:g}" if self.retain is not None else f"tokens={self.tokens}"


class BudgetFloorWarning(UserWarning):
    """An input-stage method gave an item more tokens than its budget allows, because the least the model can be
    given for it (its floor: e.g. one frame, or one temporal grid of two frames on Qwen-VL) is above the budget. The
    item's :class:`tokenzip.ItemStats` says so (``budget``, ``over_budget``) and the bench flags the row."""


def smallest_retain(n: int, count: int) -> float:
    """The smallest ``retain`` (rounded up to 3 decimals) whose budget of ``n`` tokens is at least ``count``."""
    if count >= n:
        return 1.0
    r = math.ceil(1000 * (count - 0.5) / n) / 1000
    while Budget(retain=min(1.0, r)).count(n) < count:  # guard against float rounding
        r += 0.001
    return min(1.0, round(r, 3))


def nearest_achievable(k: int, achievable: "tuple[int, ...] | list[int]") -> int:
    """The count an input-stage method takes for a budget of ``k`` tokens when only the counts in ``achievable`` can
    be produced (e.g. the grids an image can be resized to): the largest one at or under ``k``, so the budget is met
    exactly whenever it can be; when every achievable count exceeds ``k``, the smallest one (the least the model can
    be given, which the item then gets even though it is over the budget)."""
    counts = sorted({int(c) for c in achievable})
    if not counts or counts[0] < 1:
        raise ValueError(f"achievable must hold token counts >= 1, got {list(achievable)!r}")
    under = [c for c in counts if c <= k]
    return under[-1] if under else counts[0]
