"""LLaVA-Scissor: semantic connected components, spatial then temporal, then a final merge of all tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops, video_ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


@dataclass
class LlavaScissor(Compressor):
    """LLaVA-Scissor ("LLaVA-Scissor: Token Compression with Semantic Connected Components for Video LLMs", Sun et
    al., arXiv:2506.21862), on one video item's tokens.

    Semantic Connected Components (SCC): tokens are nodes, two tokens are linked when their cosine similarity
    exceeds ``tau``, and every connected component becomes one token (the mean of its members). Spatial step: SCC
    inside each frame. Temporal step: SCC over all the frames' component tokens together. Final merge: every
    original token joins the component token it is most similar to and each output token is the mean of the
    tokens that joined it. ``tau`` defaults to the authors' 0.95.

    Budget mapping: the paper's token count follows from ``tau``; here the temporal step's threshold is the one at
    which exactly the budget's number of components remains: the components are those of a single-linkage cut
    (the strongest ``m - k`` edges of a maximum spanning tree of the similarity graph, whose components at any
    threshold are exactly the SCC at that threshold). When the spatial step at ``tau`` leaves fewer tokens than the
    budget, each frame keeps at least its share of the budget (a single-linkage cut of the frame at that count).
    Departures: components are exact (Union-Find over a spanning tree) where the reference approximates them by
    sampling ``log(n) / epsilon^2`` nodes at random; in the final merge the reference adds the component token as
    one more member of the mean, here an output token is the mean of original tokens only, and the member most
    similar to a component token is pinned to it so that no output token is empty. A trailing ``newline`` token
    (LLaVA-OneVision) is kept as is and counts toward the budget (dropped only when the budget is one token).
    """

    tau: float = 0.95
    info: ClassVar[MethodInfo] = MethodInfo(
        name="llava_scissor", family="similarity", modalities=("video",), stage="pre_llm", query_aware=False,
        reference="LLaVA-Scissor: Token Compression with Semantic Connected Components for Video LLMs, "
                  "arXiv:2506.21862")

    def __post_init__(self) -> None:
        super().__post_init__()
        video_ops.check_float("tau", self.tau, -1.0, 1.0)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        return video_ops.compress_items(tokens, k, layout, lambda i, frames, kf: self._labels(tokens[i].float(),
                                                                                               frames, kf))

    def _labels(self, x: torch.Tensor, frames: list[video_ops.Frame], k_frames: int) -> torch.Tensor:
        dev = x.device
        positions = [video_ops.frame_positions(f, dev) for f in frames]
        spatial = [video_ops.single_linkage(x[p], threshold=self.tau) for p in positions]
        counts = [int(s.max()) + 1 for s in spatial]
        if sum(counts) < k_frames:
            shares = ops.split_budget([p.shape[0] for p in positions], k_frames)
            spatial = [s if c >= q else video_ops.single_linkage(x[p], count=q)
                       for s, c, q, p in zip(spatial, counts, shares, positions)]
            counts = [int(s.max()) + 1 for s in spatial]
        # the spatial components' tokens (their members' means) and the component of every frame token
        component = torch.full((x.shape[0],), -1, dtype=torch.long, device=dev)
        base = 0
        for p, s, c in zip(positions, spatial, counts):
            component[p] = s + base
            base += c
        ones = torch.ones(x.shape[0], device=dev)
        valid = component >= 0
        size = torch.zeros(base, device=dev).scatter_add_(0, component[valid], ones[valid])
        spatial_tokens = torch.zeros(base, x.shape[1], device=dev).index_add_(0, component[valid], x[valid])
        spatial_tokens = spatial_tokens / size[:, None]
        temporal = video_ops.single_linkage(spatial_tokens, count=k_frames)  # spatial component -> final group
        group = torch.where(valid, temporal[component.clamp(min=0)], -1)
        mass = torch.zeros(k_frames, device=dev).scatter_add_(0, group[valid], ones[valid])
        centres = torch.zeros(k_frames, x.shape[1], device=dev).index_add_(0, group[valid], x[valid]) / mass[:, None]
        # final merge: every token joins its most similar component token; each component's most similar member
        # is pinned to it so that every output token keeps at least one member
        members = torch.nonzero(valid).flatten()
        sim = F.normalize(x[members], dim=-1) @ F.normalize(centres, dim=-1).T
        labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=dev)
        labels[members] = torch.argmax(sim, dim=1)
        own = sim.masked_fill(group[members][:, None] != torch.arange(k_frames, device=dev)[None], float("-inf"))
        pinned = torch.argmax(own, dim=0)  # per component: its member most similar to it (ties: the earliest)
        labels[members[pinned]] = torch.arange(k_frames, device=dev)
        return labels
