"""FastVID: dynamic temporal segmentation, then density-based spatio-temporal pruning per segment."""

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


@dataclass
class FastVID(Compressor):
    """FastVID ("FastVID: Dynamic Density Pruning for Fast Video Large Language Models", Shen et al.,
    arXiv:2503.11187), on one video item's tokens.

    DySeg: every frame gets a global feature, consecutive frames are compared by cosine similarity, and the video is
    cut at the ``min_segments - 1`` least similar transitions together with every transition below ``tau``.
    STPrune, per frame budget ``b`` (the item's budget shared over its frames in proportion to their tokens):
    ``b - floor(b * context_ratio)`` salient tokens are kept by ``cls_attention`` (ATS); the frame's other
    ``floor(b * context_ratio)`` tokens are contributed to its segment's context budget (DTM). In each segment,
    anchor frames are every ``anchor_stride``-th frame counted from the segment's last frame; the context budget
    is shared over the anchors, each anchor frame's density peaks (DPC-KNN over its non-salient tokens:
    density from the ``neighbors`` nearest, the token itself included, times the distance to the nearest denser
    token) become context tokens, and every non-salient token of the segment, in every frame, is merged into the
    peak it is most cosine-similar to. Defaults are the authors' LLaVA-OneVision settings (c = 8, tau = 0.9,
    d = 0.4, p = 4, k = 4).

    Departures: (1) the global frame feature is the mean of the frame's tokens (the reference uses SigLIP's
    attention-pooling head output, which the adapters do not expose); (2) the reference compares every segment
    token with each anchor frame's peaks separately, so one token feeds a peak in every anchor, and blends a
    peak with its cluster's mean with weight ``max(1 / (members + 1), beta = 0.6)``; here each token joins exactly
    one peak of its segment (so the source map is a partition) and a merged token is the plain mean of its
    members, the peak included; (3) the reference shares a segment's context budget equally with floor division
    (dropping the remainder) — we share it in proportion to each anchor's non-salient tokens (equal for equal
    frames) so the budget is met exactly, and when the anchors hold fewer non-salient tokens than the context
    budget (budgets near N) the anchor stride is lowered until they suffice; (4) density ties are broken by
    position (earlier counts as denser) instead of random noise. A trailing ``newline`` token (LLaVA-OneVision)
    is kept as is, as the reference appends it after pruning, and counts toward the budget (dropped only when the
    budget is one token).
    """

    min_segments: int = 8
    tau: float = 0.9
    context_ratio: float = 0.4
    anchor_stride: int = 4
    neighbors: int = 4
    info: ClassVar[MethodInfo] = MethodInfo(
        name="fastvid", family="similarity", modalities=("video",), stage="pre_llm", query_aware=False,
        reference="FastVID: Dynamic Density Pruning for Fast Video Large Language Models, arXiv:2503.11187")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)

    def __post_init__(self) -> None:
        super().__post_init__()
        video_ops.check_int("min_segments", self.min_segments, 1)
        video_ops.check_float("tau", self.tau, -1.0, 1.0)
        video_ops.check_float("context_ratio", self.context_ratio, 0.0, 1.0)
        video_ops.check_int("anchor_stride", self.anchor_stride, 1)
        video_ops.check_int("neighbors", self.neighbors, 1)

    def segments(self, x: torch.Tensor, frames: list[video_ops.Frame]) -> list[tuple[int, int]]:
        """DySeg: frame ranges ``[start, end)`` of one item's tokens ``x`` ``[N, D]``."""
        if len(frames) < 2:
            return [(0, len(frames))]
        sims = video_ops.adjacent_similarity(video_ops.frame_means(x, frames))
        lowest = torch.sort(sims, stable=True).indices[: self.min_segments - 1]  # ties: the earlier transition
        below = torch.nonzero(sims < self.tau).flatten()
        return video_ops.segments_from_cuts(torch.cat([lowest, below]).tolist(), len(frames))

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        return video_ops.compress_by_attention(tokens, k, layout, signals, self._labels)

    def _labels(self, x: torch.Tensor, attention: torch.Tensor, frames: list[video_ops.Frame],
                k_frames: int) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        labels = torch.full((n,), -1, dtype=torch.long, device=dev)
        sizes = [h * w for _, h, w in frames]
        budgets = ops.split_budget(sizes, k_frames)
        salient_count = [b - math.floor(b * self.context_ratio) for b in budgets]
        rest = []  # per frame: positions of its non-salient tokens, ascending
        for f, frame in enumerate(frames):
            pos = video_ops.frame_positions(frame, dev)
            top = pos[ops.stable_topk(attention[pos][None], salient_count[f])[0]]
            labels[top] = top  # a salient token is its own group
            keep = torch.ones(pos.shape[0], dtype=torch.bool, device=dev)
            keep[top - pos[0]] = False
            rest.append(pos[keep])
        xn = F.normalize(x, dim=-1)
        for start, end in self.segments(x, frames):
            context = sum(budgets[f] - salient_count[f] for f in range(start, end))
            if context == 0:
                continue  # the segment's non-salient tokens are dropped
            stride = self.anchor_stride
            while True:  # anchors: every stride-th frame from the segment's end, enough to hold the context budget
                anchors = [f for f in range(start, end) if (end - 1 - f) % stride == 0]
                capacity = [rest[f].shape[0] for f in anchors]
                if sum(capacity) >= context or stride == 1:
                    break
                stride -= 1
            peaks = []
            for f, quota in zip(anchors, ops.split_budget(capacity, context)):
                if quota > 0:
                    centres, _ = dpc_knn_centres(x[rest[f]], quota, self.neighbors)
                    peaks.append(rest[f][torch.sort(centres).values])
            peak_pos = torch.cat(peaks)
            members = torch.cat([rest[f] for f in range(start, end)])
            nearest = torch.argmax(xn[members] @ xn[peak_pos].T, dim=1)  # first maximum: the earliest peak
            labels[members] = peak_pos[nearest]
            labels[peak_pos] = peak_pos  # a peak always stays in its own group
        return labels
