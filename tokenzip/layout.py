"""How one item's tokens tile space and time: the one layout shared by every stage and by the pictures.

An item (an image, a clip, an audio stream) is a sequence of **segments**, in token order. Each segment is a
row-major block of ``t`` frames of ``h x w`` tokens and has a kind:

- ``"image"``  a spatial grid (one view of an image; ``t == 1``)
- ``"cls"``    a class token (``1 x 1``) kept in front of a grid (LLaVA with the "full" feature strategy)
- ``"base"``   the base (thumbnail) view of an AnyRes image (LLaVA-OneVision)
- ``"crops"``  the AnyRes crop grid, stitched into one ``h x w`` grid
- ``"frames"`` video: ``t`` frames (or temporal patches) of ``h x w`` tokens each
- ``"audio"``  1-D audio frames (``t == h == 1``, ``w`` frames)
- ``"newline"`` one standalone row-end marker token (``1 x 1``; LLaVA-OneVision's untiled images)

``newline=True`` marks a segment whose last column holds the model's row-end markers (LLaVA-OneVision's
image-newline tokens): they are tokens of the item and count toward its budget, but carry no pixels.

A :class:`Layout` is also the tuple of its per-frame spatial grids ``(h, w)`` (a ``t``-frame segment contributes
``t`` of them), which is what spatial methods iterate over; :meth:`Layout.frames` and :attr:`Layout.segments` give
the time axis to the methods that want it, without knowing which model produced the item.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("image", "cls", "base", "crops", "frames", "audio", "newline")


@dataclass(frozen=True)
class Segment:
    kind: str
    t: int
    h: int
    w: int
    newline: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"segment kind must be one of {KINDS}, got {self.kind!r}")
        if min(self.t, self.h, self.w) < 1:
            raise ValueError(f"segment sizes must be >= 1, got t={self.t}, h={self.h}, w={self.w}")
        if self.newline and self.w < 2:
            raise ValueError("a segment with a newline column needs w >= 2")

    @property
    def size(self) -> int:
        return self.t * self.h * self.w


class Layout(tuple):
    """An immutable layout: the tuple of per-frame ``(h, w)`` grids, with the segments that made it."""

    segments: tuple[Segment, ...]

    def __new__(cls, segments: Sequence[Segment]) -> "Layout":
        segments = tuple(segments)
        if not segments or not all(isinstance(s, Segment) for s in segments):
            raise TypeError("a Layout is a non-empty sequence of Segment")
        self = super().__new__(cls, [(s.h, s.w) for s in segments for _ in range(s.t)])
        self.segments = segments
        return self

    @property
    def n(self) -> int:
        """Number of tokens the layout tiles."""
        return sum(s.size for s in self.segments)

    def frames(self) -> list[tuple[int, int, int]]:
        """``(start, h, w)`` of every frame (spatial grid) in token order: what a frame-wise method iterates."""
        out, start = [], 0
        for s in self.segments:
            for _ in range(s.t):
                out.append((start, s.h, s.w))
                start += s.h * s.w
        return out

    @property
    def num_frames(self) -> int:
        return sum(s.t for s in self.segments if s.kind == "frames")

    def newline_mask(self) -> list[bool]:
        """Per token: True where the token is a row-end marker of a ``newline`` segment."""
        out: list[bool] = []
        for s in self.segments:
            row = [False] * (s.w - 1) + [s.newline or s.kind == "newline"]
            out += row * (s.t * s.h)
        return out

    def __repr__(self) -> str:
        return f"Layout({list(self.segments)!r})"

    def __reduce__(self) -> Any:
        return (Layout, (self.segments,))


def grid(h: int, w: int, kind: str = "image") -> Layout:
    return Layout([Segment(kind, 1, h, w)])


def frames(t: int, h: int, w: int) -> Layout:
    return Layout([Segment("frames", t, h, w)])


def audio(n: int) -> Layout:
    return Layout([Segment("audio", 1, 1, n)])


def as_layout(spec: Any, n: int) -> Layout:
    """Normalise a layout given as a :class:`Layout`, ``(h, w)``, a list of ``(h, w)`` grids tiling the tokens in
    order, or ``None`` (a square grid when ``n`` is a perfect square, else 1-D ``(1, n)``), checking it tiles ``n``."""
    if isinstance(spec, Layout):
        layout = spec
    elif spec is None:
        side = math.isqrt(n)
        layout = grid(side, side) if side * side == n else Layout([Segment("image", 1, 1, n)])
    else:
        if len(spec) == 2 and all(isinstance(v, int) for v in spec):
            spec = [tuple(spec)]
        try:
            pairs = [(int(h), int(w)) for h, w in spec]
        except (TypeError, ValueError):
            raise ValueError(f"grid must be (h, w), a list of (h, w) grids or a Layout, got {spec!r}") from None
        if any(h < 1 or w < 1 for h, w in pairs):
            raise ValueError(f"grid {pairs} does not tile {n} tokens (need every h, w >= 1)")
        layout = Layout([Segment("image", 1, h, w) for h, w in pairs])
    if layout.n != n:
        raise ValueError(f"grid {list(layout)} does not tile {n} tokens (need sum of h*w == {n})")
    return layout
