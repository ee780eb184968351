"""Bilinear down-sampling of the token grid (LLaVA-OneVision style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


@dataclass
class Bilinear(Compressor):
    """Resize each grid of tokens to fewer cells by bilinear interpolation (linear along 1-D sequences).

    LLaVA-OneVision ("LLaVA-OneVision: Easy Visual Task Transfer", arXiv:2408.03326) bilinearly interpolates the
    feature grid of video frames / anyres crops down to a fixed token count. Departures, to meet any budget ``k``
    exactly: ``k`` is shared among the grids of a layout in proportion to their size
    (:func:`tokenzip.ops.split_budget`); each grid goes to ``rows x cols`` cells (:func:`tokenzip.ops.grid_shape`)
    and, when ``k`` is not such a product, the last band of rows is interpolated to ``last`` wider cells instead of
    ``cols``. Interpolation uses ``align_corners=False`` without antialiasing (as ``F.interpolate`` in the paper's
    code path). ``source`` maps each input token to the output cell whose region (the same ragged regions as
    ``avgpool``) covers it, and ``index`` is that region's first token; the output values are interpolated, not
    region means.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="bilinear", family="transformation", modalities=("image", "audio"), stage="pre_llm",
        query_aware=False, reference="LLaVA-OneVision: Easy Visual Task Transfer, arXiv:2408.03326 (bilinear "
                                     "interpolation of the feature grid)")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, d = tokens.shape
        alloc = ops.split_budget([h * w for h, w in layout], k)
        parts = []
        start = 0
        for (h, w), kk in zip(layout, alloc):
            grid = tokens[:, start: start + h * w]
            start += h * w
            if kk == 0:
                continue
            rows, cols, last = ops.grid_shape(h, w, kk)
            img = grid.reshape(b, h, w, d).permute(0, 3, 1, 2).float()
            if rows > 1:
                top = F.interpolate(img, size=(rows, cols), mode="bilinear", align_corners=False)
                parts.append(top[:, :, : rows - 1].flatten(2).transpose(1, 2))
            low = F.interpolate(img, size=(rows, last), mode="bilinear", align_corners=False)
            parts.append(low[:, :, rows - 1].transpose(1, 2))
        out = torch.cat(parts, dim=1).to(tokens.dtype)
        assign = ops.pool_assignment(layout, k, tokens.device)
        pos = torch.arange(n, device=tokens.device)
        first = torch.full((k,), n, dtype=torch.long, device=tokens.device)
        valid = assign >= 0
        first = first.scatter_reduce(0, assign[valid], pos[valid], reduce="amin")
        source = assign.expand(b, -1).clone()
        return CompressOutput(tokens=out, source=source, index=first.expand(b, -1).clone())
