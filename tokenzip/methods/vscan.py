"""VScan: global and local scans with token merging at the vision encoder's output, then pruning in the middle of
the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..llm.base import LLMCompressor, LLMScorer, MultiStageLLM, split_budget
from ..output import CompressOutput

REFERENCE = "Zhang et al., VScan: Rethinking Visual Token Reduction for Efficient LVLMs, arXiv:2505.22654"


def _windows(layout: ops.Layout, window: int) -> list[list[int]]:
    """Token indices of every ``window x window`` block (raster order) of every per-frame grid of ``layout``."""
    out, offset = [], 0
    for h, w in layout:
        for y0 in range(0, h, window):
            for x0 in range(0, w, window):
                out.append([offset + y * w + x for y in range(y0, min(y0 + window, h))
                            for x in range(x0, min(x0 + window, w))])
        offset += h * w
    return out


def local_scan(score: torch.Tensor, windows: list[list[int]], taken: torch.Tensor, count: int) -> list[int]:
    """``count`` tokens, at most one per window per round: each round every window offers its best untaken token
    (highest ``score``, ties: the earlier one) and the offers are taken best first (ties: the earlier window)."""
    picked: list[int] = []
    taken = taken.clone()
    while len(picked) < count:
        offers = []
        for win in windows:
            free = [i for i in win if not taken[i]]
            if free:
                vals = score[free]
                offers.append(free[int(torch.sort(vals, descending=True, stable=True).indices[0])])
        if not offers:
            break
        order = torch.sort(score[offers], descending=True, stable=True).indices.tolist()
        for o in order[: count - len(picked)]:
            picked.append(offers[o])
            taken[offers[o]] = True
    return picked


@dataclass
class VScanScan(Compressor):
    """VScan's visual-encoding stage (see :class:`VScan`)."""

    window: int = 4
    global_share: float = 0.5

    info: ClassVar[MethodInfo] = MethodInfo(
        name="vscan_scan", family="attention", modalities=("image", "video"), stage="pre_llm", query_aware=False,
        reference=REFERENCE)
    optional: ClassVar[tuple[str, ...]] = ("cls_attention", "mid_attention", "keys")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, _ = tokens.shape
        glob = signals.get("cls_attention")
        if glob is None:  # tensor level without the encoder's attention: the feature norm stands in
            glob = tokens.float().norm(dim=-1)
        local = signals.get("mid_attention", glob)
        feats = signals.get("keys", tokens).float()
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        windows = _windows(layout, self.window)
        n_global = min(k, math.floor(self.global_share * k + 0.5))
        keep_rows, target_rows = [], []
        for row in range(b):
            g = ops.stable_topk(glob[row].float().cpu()[None], n_global)[0]
            taken = torch.zeros(n, dtype=torch.bool)
            taken[g] = True
            loc = local_scan(local[row].float().cpu(), windows, taken, k - n_global)
            keep = torch.sort(torch.cat([g, torch.tensor(loc, dtype=torch.long)])).values
            # each other token folds into its most similar kept token (cosine; ties: the earlier kept token)
            sim = (feats[row] @ feats[row][keep.to(feats.device)].T).cpu()
            target = keep[torch.sort(sim, dim=1, descending=True, stable=True).indices[:, 0]]
            target[keep] = keep
            keep_rows.append(keep)
            target_rows.append(target)
        keep_idx = torch.stack(keep_rows).to(tokens.device)
        return ops.merge_into_kept(tokens, keep_idx, torch.stack(target_rows).to(tokens.device))


@dataclass
class VScanPrune(LLMScorer):
    """VScan's LLM stage (see :class:`VScan`): keep the tokens the last token attends to most, at ``layer``."""

    layer: int | None = None

    info: ClassVar[MethodInfo] = MethodInfo(
        name="vscan_prune", family="query", modalities=("image", "video"), stage="llm", query_aware=True,
        reference=REFERENCE)
    requires: ClassVar[tuple[str, ...]] = ("last_attention",)

    def stage_layer(self, num_layers: int) -> int:
        if num_layers < 2:
            raise ValueError(f"vscan needs an LLM of at least 2 layers, got {num_layers}")
        return max(1, num_layers // 2) if self.layer is None else self.check_layer(self.layer, num_layers)

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        return [(self.stage_layer(num_layers), self.budget.count(n))]

    def score_tokens(self, tokens: torch.Tensor, layout: ops.Layout, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        return signals["last_attention"]


@dataclass
class VScan(MultiStageLLM):
    """VScan ("VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models", Zhang et al.,
    arXiv:2505.22654): two stages under one name (installed as a ``tz.compose`` pipeline of its parts,
    :class:`~tokenzip.llm.base.MultiStageLLM`):

    1. **Visual encoding** (stage ``"pre_llm"``, on the vision encoder's output): a *global scan* keeps the
       ``global_share`` (0.5) of the stage's count with the highest [CLS] attention at the output layer
       (``cls_attention``: global context); a *local scan* fills the rest from ``window x window`` blocks (default 4)
       of each frame's grid, by the attention at a shallow layer (``mid_attention``, the encoder's object-centric
       layer, where the adapter produces it; else ``cls_attention``): every round each block offers its best token
       not yet kept and the offers are taken best first, so the local tokens spread over the image. Every other token
       is then *merged* into its most similar kept token (cosine of the encoder's ``keys``, else of the features;
       the kept token becomes the plain mean of its group).
    2. **LLM** (stage ``"llm"``, before the middle decoder layer ``layer``, default ``L // 2``: 16 of 32): the
       tokens the last token attends to most in the layer before are kept (text relevance, once the early layers'
       position bias has passed).

    Budget (``retain``/``tokens``): the count after stage 2 (layers from ``layer`` on see exactly it), split between
    the stages by ``share`` (default 0.5) on a log scale (:func:`tokenzip.llm.base.split_budget`): ``retain=r``
    keeps ``r ** share`` at stage 1, then ``r ** (1 - share)`` of that (``final_count`` is exact); ``tokens=k``
    brings ``round(N ** (1 - share) * k ** share)`` tokens to the LLM and ends on exactly ``k``.

    Departures: the paper's local scan takes the shallow layers' [CLS] attention, window by window, with its own
    window size and count per window; here one shallow map (``mid_attention``) and round-robin offers meet any
    count exactly. Without ``mid_attention`` (every adapter but LLaVA-1.5's) both scans read the output layer's
    attention (the local scan then only spreads the picks spatially). Tensor level without ``cls_attention``: the
    feature norm stands in. Stage 1 runs on the encoder's output, not between its layers. Per-item budget; kept
    tokens keep their original positions; ties go to the earlier token. Video: each frame's grid is scanned on its
    own, a clip is one item (an application to video).
    """

    window: int = 4
    global_share: float = 0.5
    layer: int | None = None
    share: float = 0.5

    info: ClassVar[MethodInfo] = MethodInfo(
        name="vscan", family="attention", modalities=("image", "video"), stage="llm", query_aware=True,
        reference=REFERENCE)

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        for name in ("global_share", "share"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise ValueError(f"layer must be None or an int >= 1, got {self.layer!r}")
        super().__post_init__()

    def build_parts(self) -> tuple[Compressor, LLMCompressor]:
        first, second = split_budget(self.budget, float(self.share))
        scan = VScanScan(retain=1.0, window=self.window, global_share=float(self.global_share))
        scan.budget = first
        prune = VScanPrune(retain=1.0, layer=self.layer)
        prune.budget = second
        return scan, prune
