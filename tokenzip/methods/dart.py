"""DART: inside the LLM, keep the visual tokens least duplicated by a few pivot tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMCompressor
from ..output import CompressOutput


def pivot_quotas(total: int, pivots: int) -> list[int]:
    """``total`` tokens shared over ``pivots`` pivots as evenly as possible, the earlier pivots taking the extra
    ones (e.g. 10 over 4: ``[3, 3, 2, 2]``)."""
    base, extra = divmod(total, pivots)
    return [base + (1 if j < extra else 0) for j in range(pivots)]


def dart_select(tokens: torch.Tensor, text: torch.Tensor, k: int, image_pivots: int, text_pivots: int) -> torch.Tensor:
    """DART on one item: ``tokens`` ``[N, D]`` (its hidden states), ``text`` ``[T, D]`` (the real text tokens after
    it). Returns the ``k`` kept token indices (unordered).

    The ``min(image_pivots, k)`` visual tokens of largest L1 norm are kept as pivots; the ``min(text_pivots, T)`` text
    tokens of largest L1 norm are pivots too (they are not visual, so not kept). The other ``k - p`` slots are shared
    over the pivots in that order (image pivots first, each group by descending norm; :func:`pivot_quotas`); each
    pivot in turn takes its share of the remaining visual tokens with the LOWEST cosine similarity to it (the least
    duplicated), which leave the pool. Ties go to the earlier token."""
    n = tokens.shape[0]
    x = tokens.float()
    n_img = min(image_pivots, k)
    img = ops.stable_topk(x.abs().sum(-1).unsqueeze(0), n_img)[0]
    if n_img == k:
        return img
    t = text.float()
    txt = ops.stable_topk(t.abs().sum(-1).unsqueeze(0), min(text_pivots, t.shape[0]))[0]
    pivots = torch.cat([x[img], t[txt]])
    pool = torch.ones(n, dtype=torch.bool, device=tokens.device)
    pool[img] = False
    kept = [img]
    unit = F.normalize(x, dim=-1)
    for pivot, quota in zip(pivots, pivot_quotas(k - n_img, pivots.shape[0])):
        if quota == 0:
            continue
        sim = unit @ F.normalize(pivot, dim=-1)  # [N]
        # lowest similarity first among the pool: negate, push used tokens to the end, stable for ties
        order = ops.stable_topk((-sim).masked_fill(~pool, float("-inf")).unsqueeze(0), quota)[0]
        kept.append(order)
        pool[order] = False
    return torch.cat(kept)


@dataclass
class DART(LLMCompressor):
    """DART ("Stop Looking for "Important Tokens" in Multimodal Language Models: Duplication Matters More", Wen et
    al., arXiv:2502.11494; Duplication-Aware Reduction of Tokens).

    Layers ``< layer`` (default 2, as in the paper and the authors' code: pruning after the second decoder layer;
    ``None`` = 2 clamped to ``L - 1``) run on the full sequence. Before decoder layer ``layer`` each item selects a
    few pivot tokens -- ``image_pivots`` of its own visual tokens (default 4) and ``text_pivots`` of the text tokens
    after it (default 4, the authors' defaults) -- and keeps, besides its image pivots, the visual tokens with the
    lowest cosine similarity (duplication) to the pivots, computed on the hidden states entering ``layer``. Each
    pivot in turn takes its share of the least-duplicated tokens still unpicked (:func:`dart_select`). The rest of
    the LLM runs on the kept tokens, which keep their original positions.

    Departures: the exact budget: the paper/code give every pivot ``floor(k / P)`` tokens and add the image pivots on
    top (about ``k``, not exactly); here the image pivots count inside the budget and the ``k - p`` other slots are
    shared over the ``P`` pivots, the earlier pivots taking the remainder. Pivots are the tokens of largest L1 norm of
    the hidden states entering ``layer`` (the paper's default ranks by the L1 norm of layer ``layer - 1``'s key
    states, "K-norm"; the paper's ablation reports the pivot criterion matters little, and tokenzip's LLM stage
    hands methods hidden states, not keys). The authors' code walks the pivots in set order; here image pivots come
    first, then text pivots, each by descending norm. Per-item budget (the paper prunes all image tokens of the
    prompt together); an item that no text token follows uses its image pivots only (with ``image_pivots=0`` it has
    no pivot and keeps its earliest ``k`` tokens). Ties go to the earlier token. Video: each clip is one item whose
    tokens are treated like an image's (an application to video tokens, as FastV's here; the budget is per clip).
    """

    layer: int | None = None
    image_pivots: int = 4
    text_pivots: int = 4

    info: ClassVar[MethodInfo] = MethodInfo(
        name="dart", family="similarity", modalities=("image", "video"), stage="llm", query_aware=True,
        reference="Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters "
                  "More (DART), arXiv:2502.11494")
    requires: ClassVar[tuple[str, ...]] = ("text",)
    optional: ClassVar[tuple[str, ...]] = ("text_mask",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise ValueError(f"layer must be an int >= 1, got {self.layer!r}")
        for name in ("image_pivots", "text_pivots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.image_pivots + self.text_pivots < 1:
            raise ValueError("image_pivots + text_pivots must be >= 1 (DART needs at least one pivot)")

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        layer = min(2, num_layers - 1) if self.layer is None else self.layer
        return [(self.check_layer(layer, num_layers), self.budget.count(n))]

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        text = signals["text"]
        if text.dim() != 3 or text.shape[-1] != tokens.shape[-1]:
            raise ValueError(f"text must be [B, T, {tokens.shape[-1]}] (hidden states like the tokens), got "
                             f"{tuple(text.shape)}")
        mask = signals.get("text_mask")
        if mask is not None and tuple(mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be {tuple(text.shape[:2])} (one flag per text token), got "
                             f"{tuple(mask.shape)}")
        rows = []
        for i in range(tokens.shape[0]):
            real = text[i] if mask is None else text[i][mask[i].bool()]
            if self.image_pivots == 0 and real.shape[0] == 0:  # no pivot at all (documented): the earliest k
                rows.append(torch.arange(k, device=tokens.device))
                continue
            rows.append(dart_select(tokens[i], real, k, self.image_pivots, self.text_pivots))
        return ops.select(tokens, torch.stack(rows))
