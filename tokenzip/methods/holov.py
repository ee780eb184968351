"""HoloV: the budget spread over spatial crops by their holistic score; each crop keeps its most attended tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput

# below this mean similarity variance a crop's tokens are (near) identical: no variance term (the authors' code
# divides by the mean variance + 1e-6 instead)
VARIANCE_EPS = 1e-9


def similarity_variance(x: torch.Tensor) -> torch.Tensor:
    """``[m]``: for each row of ``x`` ``[m, D]``, the variance of its cosine similarities to the crop's other rows
    (0 for a crop of one token)."""
    m = x.shape[0]
    if m < 2:
        return torch.zeros(m, dtype=torch.float64, device=x.device)
    xn = F.normalize(x.double(), dim=-1)
    sim = xn @ xn.T
    off = ~torch.eye(m, dtype=torch.bool, device=x.device)
    others = sim[off].view(m, m - 1)
    return others.var(dim=1, unbiased=False)


def holistic_scores(attention: torch.Tensor, variance: torch.Tensor, alpha: float) -> torch.Tensor:
    """HoloV's token score inside one crop: ``a_i + alpha * v_i * mean(a) / mean(v)``: the attention plus the
    semantic variance rescaled to the attention's mean magnitude over the crop (no variance term when the crop's
    variance is all 0)."""
    a = attention.double()
    mean_v = float(variance.abs().mean()) if variance.numel() else 0.0
    if mean_v <= VARIANCE_EPS:
        return a
    return a + alpha * variance * (float(a.abs().mean()) / mean_v)


def holov_select(x: torch.Tensor, attention: torch.Tensor, crops: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """HoloV on one item: ``x`` ``[N, D]``, ``attention`` ``[N]``, ``crops`` ``[N]`` each token's crop ``0..C-1``.
    Returns ``k`` token indices (unordered)."""
    members = [torch.nonzero(crops == c).flatten() for c in range(int(crops.max()) + 1)]
    members = [m for m in members if m.numel()]
    weights = []
    for m in members:
        score = holistic_scores(attention[m], similarity_variance(x[m]), alpha)
        weights.append(max(0.0, float(score.mean())))
    # compared at 6 significant digits (of the largest): attention kernels (SDPA, eager) differ in the last bits,
    # which must not move a tie between crops of equal attention
    top = max(weights)
    weights = [round(w / top * 1e6) for w in weights] if top > 0 else weights
    counts = ops.split_weighted([m.numel() for m in members], weights, k)
    chosen = [m[ops.stable_topk(attention[m].float().unsqueeze(0), q)[0]] for m, q in zip(members, counts) if q]
    return torch.cat(chosen)


@dataclass
class HoloV(Compressor):
    """HoloV ("Don't Just Chase "Highlighted Tokens" in MLLMs: Revisiting Visual Holistic Context Retention", Zou et
    al., NeurIPS 2025, arXiv:2510.02912).

    Before the LLM, each image's grid is cut into spatial crops and the budget is spread over them, so the kept
    tokens cover the whole scene instead of piling up in one salient region. Inside a crop every token gets a
    holistic score: its attention (``cls_attention``, [CLS] attention mean over heads, as the authors read CLIP's
    feature layer) plus ``alpha`` (0.09, the authors' setting) times the variance of its cosine similarities to the
    crop's other tokens, that variance rescaled so its mean over the crop equals the attention's mean. A crop's
    importance is its tokens' mean score; the budget is shared in proportion to it, and each crop keeps its tokens
    of highest attention (as in the authors' code: the variance acts through the crop's importance only, which is
    ``(1 + alpha)`` times the crop's mean attention unless its tokens are all alike). The number of crops follows
    the authors' code: ``max(1, floor(16/9 * N / k))`` (16 crops for LLaVA-1.5's 576 tokens at k = 64).

    Departures from the authors' code (``llava/model/utils.py``, ``qwen-model-HoloV/utils.py``; the paper's method
    section could not be read here, so the code is the reference): crops are rectangles tiling each grid
    (:func:`tokenzip.ops.pool_assignment`, at least one per grid), where the code cuts the flat token sequence into
    equal contiguous chunks (1.5-row bands on LLaVA's 24 x 24 grid); the shares are water-filled with largest
    remainders (:func:`tokenzip.ops.split_weighted`: a crop never gets more than its tokens, what it cannot take goes
    to the others, every crop gets one token while ``k`` allows), where the code floors ``k * w_c``, hands the
    remainder to the heaviest crops and pads the output with zero tokens when a crop's share exceeds its size, so
    the count is exact here; the similarity variance runs over the other tokens only (the code also counts the
    zeroed self-similarity) and a one-token crop scores its attention (the code leaves it unscaled, 1000 times
    smaller than the others); a crop whose variance is all (near) 0 gets no variance term (the code divides by the
    mean variance + 1e-6); the crop weights are compared at 6 significant digits, so that the last bits an
    attention kernel moves do not reorder crops of equal weight. Per-item budget. Ties go to the
    earliest token.
    """

    alpha: float = 0.09
    crops: int | None = None

    info: ClassVar[MethodInfo] = MethodInfo(
        name="holov", family="attention", modalities=("image",), stage="pre_llm", query_aware=False,
        reference="Zou et al., Don't Just Chase \"Highlighted Tokens\" in MLLMs: Revisiting Visual Holistic Context "
                  "Retention (HoloV), arXiv:2510.02912")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
            raise ValueError(f"alpha must be a float >= 0 (the weight of the semantic variance), got {a!r}")
        c = self.crops
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"crops must be None (the authors' rule) or an int >= 1, got {c!r}")

    def crop_count(self, n: int, k: int, grids: int) -> int:
        """Crops for an item of ``n`` tokens in ``grids`` grids kept to ``k``: the set count or the authors' rule,
        at least one per grid and at most ``n``."""
        c = self.crops if self.crops is not None else max(1, (16 * n) // (9 * k))
        return min(n, max(grids, c))

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        n = tokens.shape[1]
        crops = ops.pool_assignment(layout, self.crop_count(n, k, len(layout)), tokens.device)
        attention = signals["cls_attention"]
        rows = [holov_select(tokens[i], attention[i], crops, k, float(self.alpha)) for i in range(tokens.shape[0])]
        return ops.select(tokens, torch.stack(rows))
