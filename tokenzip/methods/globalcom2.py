"""GlobalCom2: the AnyRes thumbnail decides how hard each crop is compressed, and guides which of its tokens stay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def anyres_grids(layout: ops.Layout, n: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``((h, w), (rows, cols))``: the base view's grid and the crop grid (without its newline column) of an AnyRes
    layout (a ``base`` segment followed by a ``crops`` segment with newline markers, covering all ``n`` tokens), or
    ``None`` for any other layout."""
    segs = layout.segments
    if len(segs) != 2 or segs[0].kind != "base" or segs[1].kind != "crops" or not segs[1].newline:
        return None
    base, crops = segs[0], segs[1]
    if base.t != 1 or crops.t != 1 or base.h * base.w + crops.h * crops.w != n or crops.w < 2:
        return None
    return (base.h, base.w), (crops.h, crops.w - 1)


def crop_scales(importance: torch.Tensor, retention: float, temperature: float) -> torch.Tensor:
    """GlobalCom2's retention ratio of each crop: ``retention * (1 + p_j - mean(p))`` with ``p`` the softmax of the
    crops' global importance divided by ``temperature``, capped at 1."""
    p = torch.softmax((importance.double() - importance.max()) / temperature, dim=0)
    return (retention * (1 + p - p.mean())).clamp(max=1.0)


def globalcom2_select(cls: torch.Tensor, region: torch.Tensor, k: int, grids: tuple | None,
                      temperature: float) -> torch.Tensor:
    """GlobalCom2 on one image: ``cls`` ``[N]`` attention, ``region`` ``[N]`` (0 base view, ``j >= 1`` crop ``j``,
    ``< 0`` newline marker). Returns ``k`` token indices (unordered)."""
    n = cls.shape[0]
    device = cls.device
    cls = cls.float()
    marker = region < 0
    pool = (~marker).nonzero().flatten()
    kept_markers = marker.nonzero().flatten() if k > int(marker.sum()) and pool.numel() > 0 else pool[:0]
    rest = k - kept_markers.numel()
    if kept_markers.numel() == 0:
        pool = torch.arange(n, device=device)
    base = ((region == 0) & ~marker).nonzero().flatten()
    crop_ids = sorted({int(r) for r in region[region >= 1].tolist()})
    if grids is None or not crop_ids or base.numel() != grids[0][0] * grids[0][1]:
        # not a tiled AnyRes image: there is no thumbnail to command crops, so its attention alone ranks the tokens
        return torch.cat([kept_markers, pool[ops.stable_topk(cls[pool].unsqueeze(0), rest)[0]]])
    (h, w), (rows, cols) = grids
    start = h * w
    # the thumbnail's attention map, resized to the crop grid: the global score of every crop token
    glob = F.interpolate(cls[base].view(1, 1, h, w), size=(rows, cols), mode="bilinear", align_corners=False)[0, 0]
    crop_pos = start + (torch.arange(rows, device=device)[:, None] * (cols + 1)
                        + torch.arange(cols, device=device)[None, :])  # packed position of each crop-grid cell
    members = [(region[crop_pos] == j) for j in crop_ids]  # [rows, cols] masks
    sizes = [int(m.sum()) for m in members]
    nonmarker = base.numel() + sum(sizes)
    n_base = min(base.numel(), max(0, math.floor(rest * base.numel() / nonmarker + 0.5)))
    importance = torch.stack([glob[m].sum() for m in members])
    scales = crop_scales(importance, rest / nonmarker, temperature)
    counts = ops.split_weighted(sizes, [s * float(c) for s, c in zip(sizes, scales)], rest - n_base)
    chosen = [kept_markers, base[ops.stable_topk(cls[base].unsqueeze(0), n_base)[0]]]
    for m, count in zip(members, counts):
        pos = crop_pos[m]
        combined = F.normalize(cls[pos], dim=0) + F.normalize(glob[m], dim=0)
        chosen.append(pos[ops.stable_topk(combined.unsqueeze(0), count)[0]])
    return torch.cat(chosen)


@dataclass
class GlobalCom2(Compressor):
    """GlobalCom2 ("Compression with Global Guidance: Towards Training-free High-Resolution MLLMs Acceleration",
    Liu et al., arXiv:2501.05179; "Global Compression Commander" in its AAAI 2026 version).

    For an AnyRes image (a base thumbnail view plus a grid of crops, e.g. LLaVA-OneVision's), the thumbnail commands
    the compression before the LLM: (1) the thumbnail keeps its tokens of highest attention; (2) each crop's
    retention ratio is ``r * (1 + p_j - mean(p))`` (capped at 1), ``p`` the softmax over crops of their global
    importance divided by ``temperature`` (default 10, as in the authors' code), where a crop's global importance is
    the thumbnail attention over its region; (3) inside a crop the tokens rank by their own attention plus the
    thumbnail's attention at their place (each L2-normalised over the crop, summed), the thumbnail map resized
    bilinearly to the crop grid. Newline markers stay (as in the authors' code). Signals: ``cls_attention`` (the
    encoder's attention; LLaVA-OneVision's SigLIP has no [CLS]: attention received) and ``anyres_region``.

    Departures: the exact budget: ``r`` is the image's uniform retention over its non-marker tokens (the authors
    fix ``r`` = 0.25 for the thumbnail and each crop's base ratio and accept the resulting count), the thumbnail gets
    ``round(r * N_base)`` and the crops share the rest in proportion to ``N_j * ratio_j`` (water-filling, largest
    remainder: :func:`tokenzip.ops.split_weighted`); newlines stay while the budget leaves a token for the image.
    A crop's global importance is the resized thumbnail map summed over the crop's tokens as packed (after the
    model's unpadding and downscaling), where the authors' code sums the thumbnail cells of an even split of the
    thumbnail. Images that are not tiled (no crop grid) keep their top ``k`` by attention (the authors' code leaves
    them uncompressed). Per-item budget. Ties go to the earliest token.
    """

    temperature: float = 10.0

    info: ClassVar[MethodInfo] = MethodInfo(
        name="globalcom2", family="attention", modalities=("image",), stage="pre_llm", query_aware=False,
        reference="Liu et al., Compression with Global Guidance: Towards Training-free High-Resolution MLLMs "
                  "Acceleration (GlobalCom2), arXiv:2501.05179")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention", "anyres_region")

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not float(t) > 0:
            raise ValueError(f"temperature must be a float > 0, got {t!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        grids = anyres_grids(layout, tokens.shape[1])
        region = signals["anyres_region"].round().long()
        rows = [globalcom2_select(signals["cls_attention"][i], region[i], k, grids, float(self.temperature))
                for i in range(tokens.shape[0])]
        return ops.select(tokens, torch.stack(rows))
