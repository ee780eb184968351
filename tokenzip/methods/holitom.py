"""HoliTom: global temporal segmentation by dynamic programming, temporal merging, then spatial merging."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops, video_ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput
from .dpc_knn import dpc_knn_centres


def static_windows(sims: list[torch.Tensor | None], num_frames: int, tau: float,
                   max_window: int | None = None) -> list[tuple[int, int]]:
    """HoliTom's global redundancy-aware segmentation: the partition of ``num_frames`` frames into windows
    ``[start, end)`` that maximises the number of tokens temporal merging removes, ``sum over windows of
    (positions static across the whole window) * (window length - 1)``, by dynamic programming. ``sims[t]`` is the
    same-position similarity of frames ``t`` and ``t + 1`` (``None``: no correspondence). A position is static
    across a window when every one of its transitions inside the window exceeds ``tau``. Ties keep the shorter
    window (a single frame first)."""
    gain = {}  # (start, end) -> tokens removed by merging window [start, end)
    for start in range(num_frames):
        static = None
        for end in range(start + 2, num_frames + 1):
            s = sims[end - 2]
            if s is None or (max_window is not None and end - start > max_window):
                break
            static = s > tau if static is None else static & (s > tau)
            gain[(start, end)] = int(static.sum()) * (end - start - 1)
    best = [0] * (num_frames + 1)  # best[e]: most tokens removed in frames [0, e)
    choice = [0] * (num_frames + 1)  # the start of the last window of that optimum
    for end in range(1, num_frames + 1):
        best[end], choice[end] = best[end - 1], end - 1
        for start in range(end - 2, -1, -1):
            if (start, end) not in gain:
                break
            value = best[start] + gain[(start, end)]
            if value > best[end]:
                best[end], choice[end] = value, start
    windows, end = [], num_frames
    while end > 0:
        windows.append((choice[end], end))
        end = choice[end]
    return windows[::-1]


def static_positions(sims: list[torch.Tensor | None], windows: list[tuple[int, int]],
                     tau: float) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Per window: the mask of positions whose every transition inside the window exceeds ``tau`` and, as their
    staticness, the smallest of those similarities (``None`` for single frames)."""
    masks, scores = [], []
    for start, end in windows:
        if end - start < 2:
            masks.append(None)
            scores.append(None)
            continue
        lowest = torch.stack([sims[t] for t in range(start, end - 1)]).min(dim=0).values
        masks.append(lowest > tau)
        scores.append(lowest)
    return masks, scores


@dataclass
class HoliTom(Compressor):
    """HoliTom's outer-LLM compression ("HoliTom: Holistic Token Merging for Fast Video Large Language Models",
    Shao et al., arXiv:2505.21334), on one video item's tokens.

    Temporal merging: the video is partitioned into windows by dynamic programming so that the number of tokens
    that temporal merging removes is maximal over the whole video (global redundancy-aware segmentation; a token is
    redundant when its cosine similarity to the token at the same position in the next frame exceeds ``tau``
    along the whole window); in each window every such static position is merged into its first occurrence (one
    token, the mean over the window's frames). Spatial merging: the static tokens of a window are clustered by
    DPC-KNN (``neighbors`` nearest) and merged into their cluster centres; the remaining (dynamic) tokens of each
    frame keep the top ``cls_attention`` tokens, of which a ``contextual_ratio`` share is instead spent on DPC-KNN
    clusters of the rest (the released scripts run ``D = 0``: attention only, our default). Defaults follow the
    released LLaVA-OneVision scripts (``tau = 0.8``; they lower it to 0.65 for a 10 % budget; ``K = 7``; merged
    tokens are plain means: ``NO_BETA``).

    Budget mapping: the item's budget (the paper's retention ratio, which the reference rescales by the share that
    temporal merging left) is shared over the windows' static sets and the frames' dynamic sets in proportion to
    their sizes, so it is met exactly. When temporal merging alone would leave fewer tokens than the budget, the
    least static positions (lowest similarity) are released back to their frames first. Departures: the reference
    caps DPC-KNN's neighbour count at the number of clusters (``k = min(K, clusters)``), we use ``neighbors``
    throughout; DPC-KNN density ties are broken by position instead of random noise; windows span frames of one
    grid size only. The
    paper's third stage, merging inside the LLM at a middle layer, is out of scope here (a pre-LLM method). A
    trailing ``newline`` token (LLaVA-OneVision) is kept as is and counts toward the budget (dropped only when the
    budget is one token).
    """

    tau: float = 0.8
    neighbors: int = 7
    contextual_ratio: float = 0.0
    max_window: int | None = None
    info: ClassVar[MethodInfo] = MethodInfo(
        name="holitom", family="similarity", modalities=("video",), stage="pre_llm", query_aware=False,
        reference="HoliTom: Holistic Token Merging for Fast Video Large Language Models, arXiv:2505.21334")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)

    def __post_init__(self) -> None:
        super().__post_init__()
        video_ops.check_float("tau", self.tau, -1.0, 1.0)
        video_ops.check_int("neighbors", self.neighbors, 1)
        video_ops.check_float("contextual_ratio", self.contextual_ratio, 0.0, 1.0)
        if self.max_window is not None:
            video_ops.check_int("max_window", self.max_window, 2)

    def windows(self, x: torch.Tensor, frames: list[video_ops.Frame]) -> list[tuple[int, int]]:
        """The temporal windows ``[start, end)`` of one item's tokens ``x`` ``[N, D]``."""
        return static_windows(video_ops.same_position_similarity(x, frames), len(frames), self.tau, self.max_window)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        return video_ops.compress_by_attention(tokens, k, layout, signals, self._labels)

    def _labels(self, x: torch.Tensor, attention: torch.Tensor, frames: list[video_ops.Frame],
                k_frames: int) -> torch.Tensor:
        sims = video_ops.same_position_similarity(x, frames)
        windows = static_windows(sims, len(frames), self.tau, self.max_window)
        masks, scores = static_positions(sims, windows, self.tau)
        parts = video_ops.temporal_parts(frames, windows, masks, scores, k_frames)

        def reduce(part: video_ops.Part, q: int) -> torch.Tensor:
            feats = x[part.members].mean(dim=1)  # a static unit is its window's mean token
            u = feats.shape[0]
            labels = torch.full((u,), -1, dtype=torch.long, device=x.device)
            if part.kind == "static":
                centres, dist = dpc_knn_centres(feats, q, self.neighbors)
                return video_ops.join_nearest(dist, torch.sort(centres).values)
            contextual = min(q - 1, math.floor(q * self.contextual_ratio + 0.5)) if q > 1 else 0
            dominant = ops.stable_topk(attention[part.members[:, 0]][None], q - contextual)[0]
            labels[dominant] = torch.arange(dominant.shape[0], device=x.device)
            if contextual > 0:
                rest = torch.ones(u, dtype=torch.bool, device=x.device)
                rest[dominant] = False
                rest = torch.nonzero(rest).flatten()
                centres, dist = dpc_knn_centres(feats[rest], contextual, self.neighbors)
                labels[rest] = video_ops.join_nearest(dist, torch.sort(centres).values) + dominant.shape[0]
            return labels

        return video_ops.label_parts(x.shape[0], parts, k_frames, reduce, x.device)
