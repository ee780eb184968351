"""STTM: per-frame quadtree merging (coarse to fine), then merging of overlapping nodes across consecutive frames."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from .. import ops, video_ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def pair_parent(length: int) -> torch.Tensor:
    """``[length]``: the parent of each index when an axis is halved (rounded up). An odd axis keeps its first
    index alone and pairs the rest ``(1, 2), (3, 4), ...`` (the authors' layout); an even one pairs ``(0, 1), ...``."""
    i = torch.arange(length)
    return (i + 1) // 2 if length % 2 else i // 2


class Quadtree(NamedTuple):
    """The quadtree of one ``h x w`` grid, levels from the leaves (0) to the coarsest (``levels - 1``).

    ``ancestor[l]`` ``[h * w]``: each leaf's node at level ``l``; ``sizes[l]``: the node count of level ``l``;
    ``children[l]`` ``[sizes[l]]`` (``l >= 1``): how many level ``l - 1`` nodes each node has;
    ``parent[l]`` ``[sizes[l]]`` (``l < levels - 1``): each node's parent at level ``l + 1``."""

    ancestor: list[torch.Tensor]
    sizes: list[int]
    children: list[torch.Tensor]
    parent: list[torch.Tensor]

    @property
    def levels(self) -> int:
        return len(self.sizes)


def build_quadtree(h: int, w: int) -> Quadtree:
    """Halve the grid (rounded up) until both sides are at most 2: each node is a 2 x 2 block of the level below (a
    1 x 2, 2 x 1 or 1 x 1 block along an odd side's first row/column)."""
    ancestor = [torch.arange(h * w)]
    sizes = [h * w]
    children: list[torch.Tensor] = [torch.ones(h * w, dtype=torch.long)]
    parent: list[torch.Tensor] = []
    while max(h, w) > 2:
        py, px = pair_parent(h), pair_parent(w)
        nh, nw = int(py[-1]) + 1, int(px[-1]) + 1
        up = (py[:, None] * nw + px[None, :]).flatten()  # [h * w] node -> parent
        parent.append(up)
        ancestor.append(up[ancestor[-1]])
        sizes.append(nh * nw)
        children.append(torch.bincount(up, minlength=nh * nw))
        h, w = nh, nw
    return Quadtree(ancestor, sizes, children, parent)


class FrameTree(NamedTuple):
    """One frame's quadtree with its node features and split scores."""

    tree: Quadtree
    start: int
    feats: list[torch.Tensor]  # [sizes[l], D] node features: the mean of the node's children (level 0: the tokens)
    weight: list[torch.Tensor]  # [h * w] each leaf's weight inside its level-l node (the node is their weighted sum)
    score: list[torch.Tensor]  # [sizes[l]] (l >= 1) lowest cosine similarity of the node to one of its children
    root: int  # the level the coarse-to-fine search starts at


def frame_tree(x: torch.Tensor, start: int, h: int, w: int, root_level: int) -> FrameTree:
    """The quadtree of the frame whose tokens are ``x`` ``[h * w, D]`` (float64)."""
    tree = build_quadtree(h, w)
    feats, weight, score = [x], [torch.ones(h * w, dtype=x.dtype, device=x.device)], [torch.empty(0)]
    for lvl in range(1, tree.levels):
        up = tree.parent[lvl - 1].to(x.device)
        count = tree.children[lvl].to(x.device, x.dtype)
        node = torch.zeros(tree.sizes[lvl], x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, up, feats[-1])
        node = node / count[:, None]
        cos = F.cosine_similarity(feats[-1], node[up], dim=-1)
        score.append(torch.full((tree.sizes[lvl],), math.inf, dtype=x.dtype, device=x.device)
                     .scatter_reduce(0, up, cos, reduce="amin"))
        weight.append(weight[-1] / count[tree.ancestor[lvl].to(x.device)])
        feats.append(node)
    root = max(0, tree.levels - 1 - root_level)
    return FrameTree(tree, start, feats, weight, score, root)


def stopped_levels(ft: FrameTree, threshold: float) -> list[torch.Tensor]:
    """For each level, the bool mask of its nodes the coarse-to-fine search stops at for ``threshold``: starting
    from the root level, a node stops (becomes one token) when every child is at least ``threshold`` cosine-similar
    to it, else it splits into its children; leaves always stop."""
    out: list[torch.Tensor] = [torch.zeros(0, dtype=torch.bool)] * ft.tree.levels
    active = torch.ones(ft.tree.sizes[ft.root], dtype=torch.bool, device=ft.feats[0].device)
    for lvl in range(ft.root, -1, -1):
        split = active & (ft.score[lvl] < threshold) if lvl > 0 else torch.zeros_like(active)
        out[lvl] = active & ~split
        if lvl > 0:
            active = split[ft.tree.parent[lvl - 1].to(active.device)]
    return out


def spatial_count(trees: list[FrameTree], threshold: float) -> int:
    return sum(int(m.sum()) for ft in trees for m in stopped_levels(ft, threshold))


def spatial_threshold(trees: list[FrameTree], threshold: float, k: int) -> float:
    """``threshold``, raised to the lowest value at which the spatial step leaves at least ``k`` nodes (more
    splitting): a bisection over the node scores, whose count grows monotonically with the threshold."""
    if spatial_count(trees, threshold) >= k:
        return threshold
    scores = torch.cat([s for ft in trees for s in ft.score[1: ft.root + 1]])
    cands = torch.unique(scores[scores >= threshold]).tolist()  # ascending; each split at a value just above it
    lo, hi = 0, len(cands) - 1  # the last candidate splits every node: all leaves, >= k
    while lo < hi:
        mid = (lo + hi) // 2
        if spatial_count(trees, math.nextafter(cands[mid], math.inf)) >= k:
            hi = mid
        else:
            lo = mid + 1
    return math.nextafter(cands[lo], math.inf)


def sttm_labels(x: torch.Tensor, frames: list[video_ops.Frame], k: int, threshold: float, root_level: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """STTM on one item's frame tokens: ``(labels [N], weights [N])`` with exactly ``k`` groups (``-1`` outside the
    frames), each group the weighted mean of its tokens."""
    n = x.shape[0]
    x = x.double()
    trees = [frame_tree(x[s: s + h * w], s, h, w, root_level) for s, h, w in frames]
    tau = spatial_threshold(trees, threshold, k)
    # spatial step: every leaf joins the node it stopped at; nodes are numbered in frame order, coarse levels first
    node_of = torch.full((n,), -1, dtype=torch.long, device=x.device)
    weights = torch.ones(n, dtype=x.dtype, device=x.device)
    feats, leaf_nodes, base = [], [], 0
    for ft in trees:
        stops = stopped_levels(ft, tau)
        size = ft.tree.ancestor[0].shape[0]
        local = torch.full((size,), -1, dtype=torch.long, device=x.device)
        for lvl in range(ft.root, -1, -1):
            ids = torch.full((ft.tree.sizes[lvl],), -1, dtype=torch.long, device=x.device)
            count = int(stops[lvl].sum())
            ids[stops[lvl]] = torch.arange(base, base + count, device=x.device)
            anc = ft.tree.ancestor[lvl].to(x.device)
            take = (local < 0) & stops[lvl][anc]
            local[take] = ids[anc[take]]
            weights[ft.start: ft.start + size][take] = ft.weight[lvl][take]
            feats.append(ft.feats[lvl][stops[lvl]])
            base += count
        node_of[ft.start: ft.start + size] = local
        leaf_nodes.append(local)
    feats_all = torch.cat(feats)
    m = base
    # temporal step: nodes of consecutive frames (same grid) that overlap are nested quadtree blocks; link each
    # such pair, strongest similarity first, until k groups remain (the authors' threshold, set to fit k)
    pairs = []
    for (f0, f1), (a, b) in zip(zip(frames[:-1], frames[1:]), zip(leaf_nodes[:-1], leaf_nodes[1:])):
        if f0[1:] == f1[1:]:
            pairs.append(torch.stack([a, b], dim=1))
    parent = list(range(m))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    groups = m
    if pairs and groups > k:
        pair = torch.cat(pairs)
        pair = pair[torch.sort(pair[:, 0] * m + pair[:, 1], stable=True).indices]  # frame order, then node order
        pair = torch.unique_consecutive(pair, dim=0)
        fn = F.normalize(feats_all, dim=-1)
        sim = (fn[pair[:, 0]] * fn[pair[:, 1]]).sum(dim=-1)
        for e in torch.sort(sim, descending=True, stable=True).indices.tolist():
            if groups <= k:
                break
            ra, rb = root(int(pair[e, 0])), root(int(pair[e, 1]))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
                groups -= 1
    group = torch.unique(torch.tensor([root(i) for i in range(m)], device=x.device), return_inverse=True)[1]
    if groups > k:
        # no temporal pair is left (a single frame, frames of different grids): the most similar groups are joined
        # (single linkage on the groups' features) so that the count is exact
        totals = torch.zeros(groups, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, group, feats_all)
        group = video_ops.single_linkage(totals, count=k)[group]  # cosine: the sums rank as the means do
    labels = torch.full((n,), -1, dtype=torch.long, device=x.device)
    inside = node_of >= 0
    labels[inside] = group[node_of[inside]]
    return labels, weights


@dataclass
class STTM(Compressor):
    """STTM ("Multi-Granular Spatio-Temporal Token Merging for Training-Free Acceleration of Video LLMs", Hyun et
    al., ICCV 2025, arXiv:2507.07990), query-agnostic, before the LLM.

    Spatial step, per frame: a quadtree over the frame's token grid (each node the mean of its 2 x 2 children;
    levels halve the grid, rounded up, until both sides are at most 2). A coarse-to-fine search starts at level
    ``root_level`` below the coarsest one: a node whose children are all at least ``threshold`` cosine-similar to it
    becomes one token, otherwise it splits into its children; leaves are single tokens. This turns each frame into
    multi-granular tokens (large uniform regions as one token). Temporal step: a node of one frame and a node of the
    next frame that overlap (quadtree blocks nest, so one contains the other) are merged when their features are
    similar; merges chain across frames (union-find), and each output token is the plain mean of its nodes' features.
    ``threshold`` (0.85) and ``root_level`` (1) are the authors' settings for LLaVA-Video at a 50 % budget.

    Budget (the paper's count follows from two thresholds; here it is exact): the temporal threshold is set per
    item so that exactly ``k`` groups remain: the node pairs are linked strongest first until ``k`` groups are
    left (the groups of a threshold are the components of the pairs above it, so this is that threshold, cut
    exactly). When the spatial step at ``threshold`` already leaves fewer than ``k`` nodes, its threshold is raised
    to the lowest value that leaves at least ``k``. When the temporal pairs cannot bring the count down to ``k`` (a
    single frame, frames of different grids), the remaining groups most similar to each other are joined (single
    linkage on their mean features). LLaVA-OneVision's trailing newline token is kept while ``k`` leaves a token for
    the frames. Other departures: the authors' scripts merge the hidden states after LLM layer 2 (their code
    also runs on the LLM's input, layer 0) and renumber the positions; here the tokens are merged before the LLM and
    keep their first member's position. Levels halve until both sides are at most 2 (the authors stop when either
    side reaches 2; the same for square grids). Ties go to the earlier node pair. Uses no signals.
    """

    threshold: float = 0.85
    root_level: int = 1

    info: ClassVar[MethodInfo] = MethodInfo(
        name="sttm", family="similarity", modalities=("video",), stage="pre_llm", query_aware=False,
        reference="Hyun et al., Multi-Granular Spatio-Temporal Token Merging for Training-Free Acceleration of Video "
                  "LLMs (STTM), arXiv:2507.07990")

    def __post_init__(self) -> None:
        super().__post_init__()
        video_ops.check_float("threshold", self.threshold, -1.0, 1.0)
        video_ops.check_int("root_level", self.root_level, 0)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, _ = tokens.shape
        frames, markers = video_ops.frames_and_markers(layout)
        keep_markers = k > len(markers)
        k_frames = k - len(markers) if keep_markers else k
        assigns, weights = [], []
        for i in range(b):
            labels, w = sttm_labels(tokens[i], frames, k_frames, float(self.threshold), int(self.root_level))
            if keep_markers and markers:
                labels[markers] = torch.arange(k_frames, k, device=tokens.device)
            assigns.append(labels)
            weights.append(w)
        return ops.merge(tokens, torch.stack(assigns), k, torch.stack(weights))
