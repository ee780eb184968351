"""PruneVid: temporal segments by frame clustering, static tokens merged across time, then spatial clustering."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops, video_ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput
from .dpc_knn import dpc_knn_centres


def contiguous_runs(labels: list[int]) -> list[tuple[int, int]]:
    """Make a frame clustering temporally contiguous, as PruneVid refines its clusters: each cluster keeps its
    longest run of consecutive frames (the first on ties; a cluster whose runs are all single frames keeps none),
    and every other run joins the longer of its neighbouring kept runs (the left one on ties). Returns the runs
    ``[start, end)`` in order."""
    n = len(labels)
    runs = []  # (start, end, label)
    for t in range(n):
        if runs and runs[-1][2] == labels[t] and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1, labels[t])
        else:
            runs.append((t, t + 1, labels[t]))
    longest: dict[int, tuple[int, int]] = {}
    for start, end, label in runs:
        if label not in longest or end - start > longest[label][1] - longest[label][0]:
            longest[label] = (start, end)
    kept = [(s, e) for s, e, label in runs if longest[label] == (s, e) and e - s > 1]
    if not kept:
        return [(0, n)]
    owner = [-1] * n  # frame -> index of its kept run
    for j, (s, e) in enumerate(kept):
        owner[s:e] = [j] * (e - s)
    t = 0
    while t < n:
        if owner[t] >= 0:
            t += 1
            continue
        gap_end = t
        while gap_end < n and owner[gap_end] < 0:
            gap_end += 1
        left = owner[t - 1] if t > 0 else -1
        right = owner[gap_end] if gap_end < n else -1
        length = {j: kept[j][1] - kept[j][0] for j in (left, right) if j >= 0}
        target = left if right < 0 or (left >= 0 and length[left] >= length[right]) else right
        owner[t:gap_end] = [target] * (gap_end - t)
        t = gap_end
    bounds = [0] + [t for t in range(1, n) if owner[t] != owner[t - 1]] + [n]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass
class PruneVid(Compressor):
    """PruneVid's spatial-temporal token merging ("PruneVid: Visual Token Pruning for Efficient Video Large
    Language Models", Huang et al., arXiv:2412.16117), on one video item's tokens.

    Temporal segmentation: the frames' mean tokens are clustered by DPC-KNN into
    ``max(1, floor(T * segment_ratio))`` clusters and the clustering is made temporally contiguous (each cluster
    keeps its longest run; other runs join the longer neighbouring run). Static tokens: in a segment, a position
    whose tokens' mean pairwise cosine similarity over the segment's frames exceeds ``tau`` is static and its
    tokens are merged into one (their mean over time); the others are dynamic, per frame. Spatial merging: the
    segment's static tokens, and each frame's dynamic tokens, are clustered by DPC-KNN (``neighbors`` nearest) and
    every cluster merged into one token. Defaults follow the paper's released settings (``tau = 0.8``, temporal
    segment ratio 0.25, ``k = 7``).

    Budget mapping: the paper keeps a fixed ``cluster_ratio`` of every static and dynamic set; here the item's
    budget is shared over those sets in proportion to their sizes, so it is met exactly, and when temporal merging
    alone would leave fewer tokens than the budget the least static positions are released back to their frames
    first. Departures: the reference skips spatial clustering of sets of at most 14 tokens (we cluster every set,
    to meet the budget); DPC-KNN density ties are broken by position instead of random noise; segments span frames
    of one grid size only (a grid change starts a segment). The paper's second and third stages (question-guided
    selection of the tokens by the LLM's attention, KV-cache compression) are out of scope here (a pre-LLM
    method). A trailing ``newline`` token (LLaVA-OneVision) is kept as is and counts toward the budget (dropped
    only when the budget is one token).
    """

    tau: float = 0.8
    segment_ratio: float = 0.25
    neighbors: int = 7
    info: ClassVar[MethodInfo] = MethodInfo(
        name="prunevid", family="similarity", modalities=("video",), stage="pre_llm", query_aware=False,
        reference="PruneVid: Visual Token Pruning for Efficient Video Large Language Models, arXiv:2412.16117")

    def __post_init__(self) -> None:
        super().__post_init__()
        video_ops.check_float("tau", self.tau, -1.0, 1.0)
        video_ops.check_float("segment_ratio", self.segment_ratio, 0.0, 1.0, low_open=True)
        video_ops.check_int("neighbors", self.neighbors, 1)

    def segments(self, x: torch.Tensor, frames: list[video_ops.Frame]) -> list[tuple[int, int]]:
        """Temporal segments ``[start, end)`` of one item's tokens ``x`` ``[N, D]``."""
        t = len(frames)
        count = max(1, math.floor(t * self.segment_ratio))
        feats = video_ops.frame_means(x, frames)
        centres, dist = dpc_knn_centres(feats, count, self.neighbors)
        labels = video_ops.join_nearest(dist, torch.sort(centres).values).tolist()
        out = []
        for start, end in contiguous_runs(labels):  # a change of grid size starts a new segment
            cut = start
            for f in range(start + 1, end):
                if frames[f][1:] != frames[f - 1][1:]:
                    out.append((cut, f))
                    cut = f
            out.append((cut, end))
        return out

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        return video_ops.compress_items(tokens, k, layout, lambda i, frames, kf: self._labels(tokens[i].float(),
                                                                                               frames, kf))

    def _labels(self, x: torch.Tensor, frames: list[video_ops.Frame], k_frames: int) -> torch.Tensor:
        windows = self.segments(x, frames)
        xn = F.normalize(x, dim=-1)
        masks, scores = [], []
        for start, end in windows:
            if end - start < 2:
                masks.append(None)
                scores.append(None)
                continue
            stack = torch.stack([xn[video_ops.frame_positions(frames[f], x.device)] for f in range(start, end)])
            gram = torch.einsum("apd,bpd->pab", stack, stack)  # [h*w, L, L] per position
            length = end - start
            mean_sim = (gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)) / (length * (length - 1))
            masks.append(mean_sim > self.tau)
            scores.append(mean_sim)
        parts = video_ops.temporal_parts(frames, windows, masks, scores, k_frames)

        def reduce(part: video_ops.Part, q: int) -> torch.Tensor:
            feats = x[part.members].mean(dim=1)
            centres, dist = dpc_knn_centres(feats, q, self.neighbors)
            return video_ops.join_nearest(dist, torch.sort(centres).values)

        return video_ops.label_parts(x.shape[0], parts, k_frames, reduce, x.device)
