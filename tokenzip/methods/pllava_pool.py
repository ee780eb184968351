"""PLLaVA: adaptive average pooling of the (time, height, width) token volume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def temporal_bins(frames: list[tuple[int, int, int]], stride: int) -> list[list[int]]:
    """Consecutive frames of the same grid, in bins of ``stride`` frames (the last bin of a run may be shorter)."""
    bins: list[list[int]] = []
    run_start = 0
    for i, (_, h, w) in enumerate(frames):
        if i == 0 or frames[i - 1][1:] != (h, w) or i - run_start >= stride:
            run_start = i
            bins.append([])
        bins[-1].append(i)
    return bins


@dataclass
class PLLaVAPool(Compressor):
    """Spatio-temporal adaptive average pooling ("PLLaVA: Parameter-free LLaVA Extension from Images to Videos for
    Video Dense Captioning", Xu et al., arXiv:2404.16994).

    PLLaVA average-pools the ``(T, H, W)`` volume of frame features to a smaller ``(T', H', W')`` with adaptive
    pooling (``24x24 -> 12x12`` per frame, ``T' = T``: the paper finds pooling over time hurts, so time is kept by
    default). Here ``temporal_stride`` frames form one temporal bin (``1``, the default, keeps every frame; ``2``
    halves ``T``) and every bin is pooled spatially: the tokens at the same place in the bin's frames fall into one
    output token, the mean of its members.

    Budget, met exactly: the budget is shared by the temporal bins in proportion to their grid size
    (:func:`tokenzip.ops.split_budget`) and each bin's grid goes to ``rows x cols`` adaptive regions with the
    aspect ratio kept (:func:`tokenzip.ops.grid_shape`); when the count is not such a product the last band of rows
    gets fewer, wider regions (instead of the paper's fixed output shape). When the budget is smaller than the
    number of bins, time is pooled too: the frames go into ``k`` adaptive temporal bins, each pooled to one token.
    Bins never mix frames of different grids except in that last case. LLaVA-OneVision's trailing newline token
    is kept as it is while ``k`` leaves a token for the frames. Uses no signals.
    """

    temporal_stride: int = 1
    info: ClassVar[MethodInfo] = MethodInfo(
        name="pllava_pool", family="transformation", modalities=("video",), stage="pre_llm", query_aware=False,
        reference="PLLaVA: Parameter-free LLaVA Extension from Images to Videos for Video Dense Captioning, "
                  "arXiv:2404.16994")

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.temporal_stride
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"temporal_stride must be an int >= 1 (frames pooled together), got {s!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        markers, kv = ops.reserve_markers(layout, k)
        frames = ops.visual_frames(layout)
        assign = torch.full((layout.n,), -1, dtype=torch.long)
        bins = temporal_bins(frames, self.temporal_stride)
        if kv < len(bins):  # fewer tokens than temporal bins: pool time adaptively, one token per bin
            for slot, (lo, hi) in enumerate(ops._bins(len(frames), kv)):
                for start, h, w in frames[lo:hi]:
                    assign[start: start + h * w] = slot
        else:
            alloc = ops.split_budget([frames[b[0]][1] * frames[b[0]][2] for b in bins], kv)
            base = 0
            for members, kk in zip(bins, alloc):
                _, h, w = frames[members[0]]
                cells = ops.pool_assignment(ops.layout_mod.grid(h, w), kk)
                for i in members:
                    start = frames[i][0]
                    assign[start: start + h * w] = cells + base
                base += kk
        for j, m in enumerate(markers):
            assign[m] = kv + j
        return ops.merge(tokens, assign.to(tokens.device).expand(tokens.shape[0], -1), k)
