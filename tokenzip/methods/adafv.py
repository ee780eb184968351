"""AdaFV: a budget split adaptively between text-to-image similarity and [CLS] attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def text_to_image(projected: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[N]`` AdaFV's text-to-image score of one sample: for every real text token, the softmax over the ``N``
    image tokens of ``temperature`` times their cosine similarity to it; each image token keeps its maximum over the
    text tokens. Zeros when there is no text."""
    valid = mask.bool()
    if not bool(valid.any()):
        return torch.zeros(projected.shape[0], device=projected.device)
    sim = F.normalize(text[valid].float(), dim=-1) @ F.normalize(projected.float(), dim=-1).T  # [T, N]
    return torch.softmax(temperature * sim, dim=-1).max(dim=0).values


def mixture_select(t2i: torch.Tensor, cls: torch.Tensor, k: int, base_share: float) -> torch.Tensor:
    """AdaFV's self-adaptive mixture on one image: ``k`` distinct token indices (unordered).

    ``floor(base_share * k)`` tokens are taken by text-to-image score, then as many by [CLS] attention among the
    rest. The remaining ``r`` slots go ``k1`` to the next tokens by text-to-image score and ``r - k1`` to the next by
    [CLS] attention (skipping tokens already taken), with ``k1`` maximising the product of the two groups' score sums
    (the geometric mean objective; ties: the smallest ``k1``). Ties within a ranking go to the earliest token."""
    n = t2i.shape[0]
    base = math.floor(base_share * k)
    taken = torch.zeros(n, dtype=torch.bool, device=t2i.device)
    t_order = torch.sort(t2i, descending=True, stable=True).indices
    taken[t_order[:base]] = True
    c_first = ops.stable_topk(cls.float().masked_fill(taken, float("-inf")).unsqueeze(0), base)[0]
    taken[c_first] = True
    rest = k - 2 * base
    t_rest = t_order[~taken[t_order]]  # text-to-image ranking of the tokens left
    c_order = torch.sort(cls.float(), descending=True, stable=True).indices
    c_rest = c_order[~taken[c_order]]  # [CLS] ranking of the tokens left
    t_rank = torch.full((n,), n, dtype=torch.long, device=t2i.device)
    t_rank[t_rest] = torch.arange(t_rest.numel(), device=t2i.device)
    t_sums = torch.cat([t2i.new_zeros(1), torch.cumsum(t2i[t_rest].double(), 0)])
    best_k1, best = 0, float("-inf")
    for k1 in range(0, min(rest, t_rest.numel()) + 1):
        free = c_rest[t_rank[c_rest] >= k1]  # [CLS] candidates not among the first k1 text-to-image picks
        value = float(t_sums[k1]) * float(cls[free[: rest - k1]].double().sum())
        if value > best:
            best_k1, best = k1, value
    free = c_rest[t_rank[c_rest] >= best_k1]
    return torch.cat([t_order[:base], c_first, t_rest[:best_k1], free[: rest - best_k1]])


@dataclass
class AdaFV(Compressor):
    """AdaFV ("AdaFV: Rethinking of Visual-Language alignment for VLM acceleration", Han et al., arXiv:2501.09532).

    Before the LLM, each image keeps ``k`` tokens chosen from two rankings by the self-adaptive cross-modality
    attention mixture (:func:`mixture_select`): text-to-image similarity in the LLM's input embedding space
    (:func:`text_to_image`: ``projected`` image tokens against the prompt's ``text`` embeddings, softmax over the
    image tokens at temperature 100, maximum over the text tokens) and visual saliency (``cls_attention``). A share
    ``base_share`` (default 0.25, the authors' code) of ``k`` is reserved for each ranking; the rest is split
    between them to maximise the product of the selected scores' sums (the paper's geometric-mean objective).

    Departures: the authors' code takes the two groups independently and concatenates them, so a token in both is
    fed twice; here every group skips tokens already taken, so the ``k`` tokens are distinct and the product is
    evaluated on what each split really keeps. The text tokens are the whole prompt's (the ``text`` signal: the
    authors' code uses the tokens after the image). Per-item budget. No text token at all: the top ``k`` by [CLS]
    attention (there is nothing to align with). Ties go to the earliest token.
    """

    base_share: float = 0.25
    temperature: float = 100.0

    info: ClassVar[MethodInfo] = MethodInfo(
        name="adafv", family="query", modalities=("image",), stage="pre_llm", query_aware=True,
        reference="Han et al., AdaFV: Rethinking of Visual-Language alignment for VLM acceleration, arXiv:2501.09532")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention", "projected", "text", "text_mask")

    def __post_init__(self) -> None:
        super().__post_init__()
        b = self.base_share
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= float(b) <= 0.5:
            raise ValueError(f"base_share must be a float in [0, 0.5] (the share of k each ranking is sure of), "
                             f"got {b!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not float(t) > 0:
            raise ValueError(f"temperature must be a float > 0, got {t!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        proj, text, mask = signals["projected"], signals["text"], signals["text_mask"]
        if text.dim() != 3 or text.shape[-1] != proj.shape[-1]:
            raise ValueError(f"text must be [B, T, {proj.shape[-1]}] like projected, got {tuple(text.shape)}")
        if tuple(mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be {tuple(text.shape[:2])} (one flag per text token), "
                             f"got {tuple(mask.shape)}")
        rows = []
        for i in range(tokens.shape[0]):
            cls = signals["cls_attention"][i]
            if not bool(mask[i].any()):  # no text to align with: saliency alone (documented)
                rows.append(ops.stable_topk(cls.float().unsqueeze(0), k)[0])
                continue
            t2i = text_to_image(proj[i], text[i], mask[i], float(self.temperature))
            rows.append(mixture_select(t2i, cls, k, float(self.base_share)))
        return ops.select(tokens, torch.stack(rows))
