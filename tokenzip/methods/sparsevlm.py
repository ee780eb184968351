"""SparseVLM: text raters score the visual tokens inside the LLM; pruned tokens are recycled by merging."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMCompressor, geometric_counts, stage_layers
from ..output import CompressOutput
from .dpc_knn import dpc_knn_centres


@dataclass
class SparseVLM(LLMCompressor):
    """SparseVLM ("SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference", Zhang et
    al., arXiv:2410.04417).

    At each sparsification layer (default at depth fractions 2/32, 6/32, 15/32: the paper's LLaVA layers 2, 6, 15):

    1. Raters: the relevance of each text token after the item to the visual tokens is
       ``R = mean_over_visual(softmax_over_text(V T^T))`` (unscaled, as in the official code); the text tokens
       with ``R > mean(R)`` are the raters (all text tokens if none; the last token if no text follows).
    2. Scores: each visual token's score is the mean, over raters and heads, of the attention the raters pay it
       in the layer before (recomputed rows, the model keeps SDPA).
    3. Recycling: of the ``k`` slots, ``c`` hold recycled tokens: the top ``tau`` share (default 30%, plus one, as
       in the official code) of the deleted tokens by score is clustered by density peaks (DPC-KNN) into ``c``
       clusters, each merged (mean) into one token placed at its earliest member's position; the other ``k - c``
       slots keep the top-scored tokens. ``c`` follows the official rule ``candidates // 10 + 1`` (with the
       deleted count taken as ``N - k``), or ``round(recycle * k)`` when ``recycle`` is given; always ``k - c >= 1``.
       The clustering's local density counts the ``neighbors`` nearest candidates (the token itself included): by
       default (``None``) as many as there are clusters, ``c``, as the official code does (Gumpest/SparseVLMs,
       ``cluster_and_merge`` in ``llava/model/language_model/utils.py`` L188 at 26a5f48); ``neighbors=5`` is
       tokenzip's earlier fixed count (DPC-KNN's usual 5, as in ``dpc_knn``).

    Budget: ``retain``/``tokens`` is the count after the LAST sparsification layer; earlier layers keep a
    geometric share (as PyramidDrop here; the official LLaVA schedule for 192 tokens is 300/200/110 + recycled).

    Departures: the paper picks each layer's deletion count adaptively from the rank of the attention matrix; we
    follow the budget schedule instead so the final count is exact, and the recycled tokens count inside the budget
    (the official code adds them on top). Raters are chosen at every sparsification layer from the hidden states
    entering it (the official code chooses them once, from the LLM's input embeddings). Per-item budget.
    Video: each clip is one item (the paper also evaluates video QA, on Video-LLaVA).
    """

    layers: tuple[int, ...] | None = None
    tau: float = 0.3
    recycle: float | None = None
    neighbors: int | None = None

    info: ClassVar[MethodInfo] = MethodInfo(
        name="sparsevlm", family="query", modalities=("image", "video"), stage="llm", query_aware=True,
        reference="Zhang et al., SparseVLM, arXiv:2410.04417")
    requires: ClassVar[tuple[str, ...]] = ("last_attention", "text_attention", "text")

    FRACTIONS: ClassVar[tuple[float, ...]] = (2 / 32, 6 / 32, 15 / 32)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < float(self.tau) <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")
        if self.recycle is not None and not 0.0 <= float(self.recycle) < 1.0:
            raise ValueError(f"recycle must be in [0, 1), got {self.recycle!r}")
        if self.neighbors is not None and (isinstance(self.neighbors, bool) or not isinstance(self.neighbors, int)
                                           or self.neighbors < 1):
            raise ValueError(f"neighbors must be None (the number of clusters) or an int >= 1, got "
                             f"{self.neighbors!r}")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers or list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing decoder-layer indices, got {self.layers!r}")

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        if self.layers is not None:
            layers = [self.check_layer(layer, num_layers, "layers[i]") for layer in self.layers]
        else:
            layers = stage_layers(self.FRACTIONS, num_layers)
        return list(zip(layers, geometric_counts(n, self.budget.count(n), len(layers))))

    def scores(self, tokens: torch.Tensor, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, N]`` visual-token scores from the raters' attention."""
        att, text = signals.get("text_attention"), signals.get("text")
        if att is None or text is None or att.shape[1] == 0:
            return signals["last_attention"].float()
        rel = torch.softmax(tokens.float() @ text.float().transpose(1, 2), dim=-1).mean(dim=1)
        raters = rel > rel.mean(dim=-1, keepdim=True)  # [B, T]
        raters = torch.where(raters.any(dim=-1, keepdim=True), raters, torch.ones_like(raters))
        w = raters.float() / raters.float().sum(dim=-1, keepdim=True).clamp(min=1)
        return (att.float() * w.unsqueeze(-1)).sum(dim=1)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, _ = tokens.shape
        score = self.scores(tokens, signals)
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        if self.recycle is None:
            c = (math.floor(self.tau * (n - k)) + 1) // 10 + 1
        else:
            c = math.floor(self.recycle * k + 0.5)
        c = max(0, min(c, k - 1))
        deleted = n - (k - c)
        cand = min(deleted, max(c, math.floor(self.tau * deleted) + 1))
        keep = k - c
        assign = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
        for i in range(b):
            kept = order[i, :keep]
            assign[i, kept] = torch.arange(keep, device=tokens.device)
            if c > 0:
                pool = order[i, keep: keep + cand]
                centres, dist = dpc_knn_centres(tokens[i, pool], c, c if self.neighbors is None else self.neighbors)
                nearest = dist[:, centres].argmin(dim=1)
                nearest[centres] = torch.arange(c, device=tokens.device)
                assign[i, pool] = keep + nearest
        return ops.merge(tokens, assign, k)
