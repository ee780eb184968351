"""Chat-UniVi's video clustering: DPC-KNN over frames forms events, then DPC-KNN over each event's tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops, video_ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput
from .dpc_knn import dpc_knn_centres


@dataclass
class DpcKnnEvents(Compressor):
    """Event-level token clustering of Chat-UniVi ("Chat-UniVi: Unified Visual Representation Empowers Large Language
    Models with Image and Video Understanding", Jin et al., arXiv:2311.08046), applied training-free to one video
    item's tokens.

    Events: the frames' mean tokens are clustered by DPC-KNN (``frame_neighbors`` nearest) into
    ``max(1, ceil(T * event_ratio))`` clusters (Chat-UniVi's temporal cluster rate 1/16 and k = 5); each cluster is
    one event. As in the authors' code (``ChatUniVi/model/arch.py``), an event is the set of frames of one cluster,
    which need not be consecutive. Tokens: the tokens of all frames of an event are clustered together by DPC-KNN
    (``neighbors`` nearest) and each cluster is merged into one token (its mean), so a region that persists
    through an event becomes one token. The item's budget is shared over the events in proportion to their tokens.

    Departures: Chat-UniVi clusters each frame first (576 -> 64) and then the event's clustered tokens, at three
    scales (64, 32 and 16 clusters) whose outputs are concatenated, and it was trained with that representation;
    here one clustering of the event's tokens meets the budget exactly (a token belongs to one output token, as
    the source map requires), with the plain mean as in tokenzip's ``dpc_knn``. Density ties are broken by position
    instead of random noise; ties in the centre assignment go to the earliest centre. A trailing ``newline``
    token (LLaVA-OneVision) is kept as is and counts toward the budget (dropped only when the budget is one token).
    """

    event_ratio: float = 1 / 16
    frame_neighbors: int = 5
    neighbors: int = 5
    info: ClassVar[MethodInfo] = MethodInfo(
        name="dpc_knn_events", family="similarity", modalities=("video",), stage="pre_llm", query_aware=False,
        reference="Chat-UniVi: Unified Visual Representation Empowers Large Language Models with Image and Video "
                  "Understanding, arXiv:2311.08046")

    def __post_init__(self) -> None:
        super().__post_init__()
        video_ops.check_float("event_ratio", self.event_ratio, 0.0, 1.0, low_open=True)
        video_ops.check_int("frame_neighbors", self.frame_neighbors, 1)
        video_ops.check_int("neighbors", self.neighbors, 1)

    def events(self, x: torch.Tensor, frames: list[video_ops.Frame]) -> list[int]:
        """The event (``0..E-1``, numbered by first frame) of every frame of one item's tokens ``x`` ``[N, D]``."""
        count = max(1, math.ceil(len(frames) * self.event_ratio))
        centres, dist = dpc_knn_centres(video_ops.frame_means(x, frames), count, self.frame_neighbors)
        labels = video_ops.join_nearest(dist, torch.sort(centres).values)
        return _renumber(labels.tolist())

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        return video_ops.compress_items(tokens, k, layout, lambda i, frames, kf: self._labels(tokens[i].float(),
                                                                                               frames, kf))

    def _labels(self, x: torch.Tensor, frames: list[video_ops.Frame], k_frames: int) -> torch.Tensor:
        event_of = self.events(x, frames)
        members = [torch.cat([video_ops.frame_positions(f, x.device) for f, e in zip(frames, event_of) if e == j])
                   for j in range(max(event_of) + 1)]
        labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        base = 0
        for pos, q in zip(members, ops.split_budget([p.shape[0] for p in members], k_frames)):
            if q == 0:
                continue
            centres, dist = dpc_knn_centres(x[pos], q, self.neighbors)
            labels[pos] = video_ops.join_nearest(dist, torch.sort(centres).values) + base
            base += q
        return labels


def _renumber(labels: list[int]) -> list[int]:
    """Relabel ``labels`` ``0, 1, ...`` in order of first appearance."""
    seen: dict[int, int] = {}
    return [seen.setdefault(v, len(seen)) for v in labels]
