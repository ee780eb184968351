"""EViT: keep the tokens the [CLS] token attends to, fuse the rest into one token, at a few encoder layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..encoder_stage import InEncoder
from ..output import CompressOutput

REFERENCE = ("EViT: Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations, "
             "arXiv:2202.07800")
# the paper's reorganisation layers in its 12-layer ViTs (DeiT-S/B): the 4th, 7th and 10th
PAPER_LAYERS, PAPER_DEPTH = (4, 7, 10), 12


@dataclass
class EViTFuse(Compressor):
    """EViT's token reorganisation on one set of tokens (the step :class:`EViT` runs inside the encoder; not
    registered on its own). See :class:`EViT` for the paper.

    Keeps the ``k - 1`` tokens with the largest ``cls_attention`` (the [CLS] token's attention, mean over heads;
    ties: the earlier token) and fuses all the others into one token, their average weighted by that attention
    (uniform if it is zero for all of them), so ``k`` tokens leave. Kept tokens stay in input order; the fused token
    sits at the position of its first member.
    """

    info: ClassVar[MethodInfo] = MethodInfo(name="evit_fuse", family="attention", modalities=("image", "audio"),
                                            stage="pre_llm", query_aware=False, reference=REFERENCE)
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        score = signals["cls_attention"].float()
        b, n, _ = tokens.shape
        kept = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
        kept.scatter_(1, ops.stable_topk(score, k - 1), True)
        # kept tokens are groups 0 .. k-2 in input order, the inattentive ones group k - 1
        fused = torch.full((b, n), k - 1, dtype=torch.long, device=tokens.device)
        assign = torch.where(kept, torch.cumsum(kept.long(), dim=-1) - 1, fused)
        weight = score.clamp(min=0) * ~kept
        uniform = (weight.sum(-1, keepdim=True) <= 0) & ~kept  # no attention mass left to weight by
        weight = torch.where(kept | uniform, torch.ones_like(weight), weight)
        return ops.merge(tokens, assign, k, weights=weight)


class EViT(InEncoder):
    """EViT ("Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations", Liang et
    al., ICLR 2022, arXiv:2202.07800): attention-based pruning between encoder blocks.

    At a few layers EViT keeps the attentive tokens, those the [CLS] token attends to most (its attention row,
    averaged over heads, from that layer's self-attention), and fuses the inattentive ones into a single token, their
    average weighted by that attention (:class:`EViTFuse`); the later layers run on the kept tokens plus the fused
    one. The paper reorganises at the 4th, 7th and 10th of 12 layers with one keep rate at each; here those
    positions are scaled to the encoder's depth (``round(depth * l / 12)`` for ``l`` in 4, 7, 10, kept in
    ``[1, depth - 1]``, duplicates dropped) unless ``layer`` is given (any :class:`tokenzip.InEncoder` form), and a
    constant keep ratio from ``N`` to the budget at the last cut (``retain``/``tokens`` count the tokens that reach
    the LLM, the fused one included: ``k - 1`` attentive + 1 fused).

    Departures: EViT is trained with the reorganisation (it also reports it on off-the-shelf models); here it is
    applied training-free. The paper reorganises between a layer's attention and its MLP, with that attention; here
    the cut is after the layer whose attention gives the scores (its MLP also runs on every token). The fused token
    carries its size into the later layers, which give it proportional attention (``log`` size added to its logits)
    as for every merged token in the encoder stage, and when a later cut fuses it again the runner re-averages the
    group by size instead of by attention. Towers without a [CLS] token get the adapter's substitute for
    ``cls_attention`` (the mean attention each token receives, from the block's own q/k: Whisper, SigLIP), which the
    paper does not cover; so does audio.
    """

    info: ClassVar[MethodInfo] = MethodInfo(name="evit", family="attention", modalities=("image", "audio"),
                                            stage="encoder", query_aware=False, reference=REFERENCE)

    def __init__(self, retain: float | None = None, tokens: int | None = None, layer: Any = None):
        super().__init__(EViTFuse(retain=retain, tokens=tokens), layer="every" if layer is None else layer)
        self._paper_layers = layer is None
        if self._paper_layers:
            self.layer = None  # the paper's positions, scaled to the depth when the method is installed

    def resolve_layers(self, adapter: Any) -> int | tuple[int, ...]:
        if not self._paper_layers:
            return super().resolve_layers(adapter)
        depth_of = getattr(adapter, "encoder_depth", None)
        if depth_of is None:
            raise ValueError(f"EViT places its cuts by the encoder's depth, which {type(adapter).__name__} does not "
                             f"report; give layer=<int> or an increasing tuple of them")
        depth = depth_of()
        if depth < 2:
            raise ValueError(f"this encoder runs {depth} layer(s): there is no cut that leaves a layer after it")
        self.layers = tuple(sorted({min(max(1, round(depth * p / PAPER_DEPTH)), depth - 1) for p in PAPER_LAYERS}))
        return self.layers[0] if len(self.layers) == 1 else self.layers

    def __repr__(self) -> str:
        return f"EViT({self.budget}, layer={self.layer!r})"
