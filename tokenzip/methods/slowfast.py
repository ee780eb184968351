"""SlowFast token budgets: a few frames pooled lightly (slow pathway), all the others pooled hard (fast pathway)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


@dataclass
class SlowFast(Compressor):
    """Two-pathway pooling of a clip's frames ("SlowFast-LLaVA: A Strong Training-Free Baseline for Video Large
    Language Models", Xu et al., arXiv:2407.15841).

    The slow pathway takes ``slow_frames`` frames (default 8, our choice) spread uniformly over the clip (the
    centres of equal temporal bins) and keeps many tokens of each; the fast pathway pools every other frame hard
    (the paper: ``4x4`` tokens per frame, a 6x down-sampling, against e.g. ``12x24`` for a slow frame). Both
    pathways pool each frame with adaptive average pooling.

    Budget split, met exactly: a slow frame gets ``detail`` times the tokens of a fast frame of the same grid
    (``detail=18``: the paper's ``12x24`` slow vs ``4x4`` fast tokens), i.e. frame ``t`` is weighted
    ``size_t * (detail if slow else 1)`` and the budget is shared by water-filling with largest remainders
    (:func:`tokenzip.ops.split_weighted`; a frame never gets more than its own tokens, what it cannot take goes to
    the others, every frame keeps at least one token while ``k`` allows). Each frame is then pooled to its share
    with ragged adaptive regions (:func:`tokenzip.ops.pool_assignment`). Below one token per frame, time is pooled
    as well: ``k`` adaptive temporal bins of one token each.

    Departures: in the paper the slow frames are also part of the fast pathway (each slow frame is encoded twice)
    and the LLM sees all slow tokens, then all fast tokens. Here every input token feeds exactly one output token
    (the source map is a partition), so a slow frame appears once, at full share, and the output keeps time order
    and every token's original position. An anisotropic slow-frame pooling (``24x24 -> 12x24``) becomes
    aspect-preserving regions. ``slow_frames`` is clipped to the clip's frame count. LLaVA-OneVision's trailing
    newline token is kept as it is while ``k`` leaves a token for the frames. Uses no signals.
    """

    slow_frames: int = 8
    detail: float = 18.0
    info: ClassVar[MethodInfo] = MethodInfo(
        name="slowfast", family="transformation", modalities=("video",), stage="pre_llm", query_aware=False,
        reference="SlowFast-LLaVA: A Strong Training-Free Baseline for Video Large Language Models, "
                  "arXiv:2407.15841")

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.slow_frames
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"slow_frames must be an int >= 1, got {s!r}")
        d = self.detail
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 1:
            raise ValueError(f"detail must be a finite number >= 1 (slow vs fast tokens per frame), got {d!r}")

    def slow(self, num_frames: int) -> list[int]:
        """Indices of the slow frames: ``slow_frames`` spread uniformly over ``num_frames``."""
        return ops.evenly_spaced(num_frames, min(self.slow_frames, num_frames))

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        markers, kv = ops.reserve_markers(layout, k)
        frames = ops.visual_frames(layout)
        assign = torch.full((layout.n,), -1, dtype=torch.long)
        if kv < len(frames):  # under one token per frame: pool time too
            for slot, (lo, hi) in enumerate(ops._bins(len(frames), kv)):
                for start, h, w in frames[lo:hi]:
                    assign[start: start + h * w] = slot
        else:
            slow = set(self.slow(len(frames)))
            sizes = [h * w for _, h, w in frames]
            weights = [s * (float(self.detail) if i in slow else 1.0) for i, s in enumerate(sizes)]
            base = 0
            for (start, h, w), kk in zip(frames, ops.split_weighted(sizes, weights, kv)):
                assign[start: start + h * w] = ops.pool_assignment(ops.layout_mod.grid(h, w), kk) + base
                base += kk
        for j, m in enumerate(markers):
            assign[m] = kv + j
        return ops.merge(tokens, assign.to(tokens.device).expand(tokens.shape[0], -1), k)
