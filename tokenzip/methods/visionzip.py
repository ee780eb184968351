"""VisionZip: dominant tokens by [CLS] attention plus merged contextual tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def split_counts(k: int, ratio: float) -> tuple[int, int]:
    """``(major, minor)`` with ``minor = round_half_up(k * ratio)``, ``major = k - minor`` and ``major >= 1``."""
    minor = min(k - 1, math.floor(k * ratio + 0.5))
    return k - minor, minor


def even_picks(n: int, m: int, device: torch.device | None = None) -> torch.Tensor:
    """``m`` distinct, evenly spaced positions in ``range(n)`` (``m <= n``): ``floor(i * n / m)``."""
    return (torch.arange(m, device=device) * n) // m


def target_plus_mean(tokens: torch.Tensor, out: CompressOutput, targets: torch.Tensor) -> torch.Tensor:
    """Output tokens ``[B, k, D]`` of the groups in ``out`` built as the group's target (``targets`` ``[B, k]``:
    one input position per group, in any order) plus the mean of the group's other members (``0`` for a group
    of one)."""
    b, n, d = tokens.shape
    k = out.index.shape[1]
    slot_of_target = out.source.gather(1, targets)
    target_of_slot = torch.empty_like(targets).scatter_(1, slot_of_target, targets)
    is_target = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, targets, True)
    member = (out.source >= 0) & ~is_target
    slot = out.source.clamp(min=0)
    w = member.to(tokens.dtype)
    sums = torch.zeros(b, k, d, dtype=tokens.dtype, device=tokens.device)
    sums.scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, d), tokens * w.unsqueeze(-1))
    counts = torch.zeros(b, k, dtype=tokens.dtype, device=tokens.device).scatter_add_(1, slot, w)
    base = torch.gather(tokens, 1, target_of_slot.unsqueeze(-1).expand(-1, -1, d))
    return base + sums / counts.clamp(min=1).unsqueeze(-1)


CONTEXTUAL = ("sum", "mean")


@dataclass
class VisionZip(Compressor):
    """Keep the dominant tokens (highest [CLS] attention) and merge the rest into a few contextual tokens.

    "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (Yang et al., arXiv:2412.04467).
    Of the ``k`` output tokens, ``round(k * contextual_ratio)`` are contextual (default ``10/64``, the paper's
    54 dominant + 10 contextual split for LLaVA-1.5) and the rest, at least one, are dominant. Dominant: top
    ``cls_attention``. Contextual: among the remaining tokens (in sequence order) evenly spaced ones are targets
    and every other remaining token joins the target its ``keys`` (cosine) are most similar to; without ``keys``
    the tokens themselves are compared.

    A contextual token is, by default (``contextual="sum"``), its target **plus** the mean of the tokens that joined
    it (the target alone when none did), as the authors' released code builds it (dvlab-research/VisionZip,
    ``visionzip/clip_encoder.py`` L75-80 at 3151f6d): that code produced the paper's published numbers, so it is
    the default. The paper's text speaks of merging the remaining tokens into the targets; we could not check
    offline whether it spells out the target's share, so the code is the reference followed. ``contextual="mean"``
    averages the target and its tokens instead (tokenzip's earlier behaviour; each token stays on the encoder's
    feature scale). Dominant tokens are kept as they are.

    Departures: targets are at ``floor(i * R / c)`` rather than the code's fixed stride ``R // c`` (so exactly
    ``c`` targets exist for any ``R``); only the tokens the adapter hands over are candidates (for LLaVA-1.5 the
    patch tokens: the encoder's [CLS] token is dropped before the projector and only serves as the attention
    query). Ties go to the earliest token.
    """

    contextual_ratio: float = 10 / 64
    contextual: str = "sum"
    info: ClassVar[MethodInfo] = MethodInfo(
        name="visionzip", family="attention", modalities=("image",), stage="pre_llm", query_aware=False,
        reference="VisionZip: Longer is Better but Not Necessary in Vision Language Models, arXiv:2412.04467")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)
    optional: ClassVar[tuple[str, ...]] = ("keys",)

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.contextual_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
            raise ValueError(f"contextual_ratio must be a float in [0, 1), got {r!r}")
        if self.contextual not in CONTEXTUAL:
            raise ValueError(f"contextual must be one of {CONTEXTUAL}, got {self.contextual!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, _ = tokens.shape
        n_dom, n_ctx = split_counts(k, float(self.contextual_ratio))
        metric = signals.get("keys", tokens)
        dominant = ops.stable_topk(signals["cls_attention"].float(), n_dom)
        keeps, targets = [], []
        for i in range(b):
            rest_mask = torch.ones(n, dtype=torch.bool, device=tokens.device)
            rest_mask[dominant[i]] = False
            rest = rest_mask.nonzero().flatten()  # ascending positions
            target = torch.full((n,), -1, dtype=torch.long, device=tokens.device)
            keep = dominant[i]
            if n_ctx > 0:
                centres = rest[even_picks(rest.shape[0], n_ctx, tokens.device)]
                m = F.normalize(metric[i].float(), dim=-1)
                nearest = torch.argmax(m[rest] @ m[centres].T, dim=1)  # first maximum: earliest target
                target[rest] = centres[nearest]
                keep = torch.cat([keep, centres])
            target[dominant[i]] = dominant[i]
            keeps.append(keep)
            targets.append(target)
        keep = torch.stack(keeps)
        out = ops.merge_into_kept(tokens, keep, torch.stack(targets))
        if self.contextual == "sum":
            out = CompressOutput(tokens=target_plus_mean(tokens, out, keep), source=out.source, index=out.index)
        return out
