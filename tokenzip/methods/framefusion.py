"""FrameFusion: merge video tokens that repeat the previous frame in the first decoder layers, then prune by
importance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMCompressor, StageContext
from ..output import CompressOutput
from .fastv import received_attention


@dataclass
class FrameFusion(LLMCompressor):
    """FrameFusion ("FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large Vision
    Language Models", Fu et al., arXiv:2501.01986).

    Merging (similarity). Before decoder layer ``1``, ``2``, ... each video token is compared (cosine, on the current
    hidden states) with the token at the SAME spatial position in the previous frame, i.e. the nearest earlier
    remaining token of that position (after earlier merges, the representative its predecessor was merged into). A
    token whose similarity reaches ``threshold`` (default 0.6, the official code's) is merged into that
    predecessor; a run of consecutive merged tokens of one position joins the token before the run, as the plain
    mean of the members' current hidden states, placed at the earliest member (its position id). The merge
    cascades over successive layers while the share of the item's frame tokens merged at a layer is at least
    ``min_share`` (default 0.1, the official ``ratio_lower_bound``); when it falls below, merging stops.

    Pruning (importance). At the layer after merging stops, the item keeps its ``k`` remaining tokens that receive
    the most attention from the text tokens after it in the previous layer (mean over those rows and heads; the last
    token's row when no text follows), ``k`` being the budget (``retain``/``tokens`` of the item's original count).
    When a merge would go below ``k``, only the ``m - k`` most similar pairs merge and no pruning follows (as in the
    paper). Stages are planned at layers ``1 .. min(layers, L - 1)`` (default ``layers=4``); the last one prunes to
    ``k`` whatever the cascade's state. Frames are the layout's frames with the same grid; other tokens (e.g.
    LLaVA-OneVision's newline) are never merged, only pruned; an item without a frame layout (after a pre-LLM
    method) is only pruned.

    Departures: the paper's budget is a compute cost (the share of FLOPs, from which the pruning ratio is solved
    after the merges); here it is the count the item keeps after the last stage, per item. The official code merges
    first on the embeddings before layer 0 and then after each layer's attention (before its MLP); here stages sit
    at layer boundaries from layer 1 on (layer 0 stays whole, so the cache positions of new tokens are the model's
    own). The official code scores importance by the attention every token pays the visual tokens (all query rows,
    visual ones included); we use the rows of the text tokens after the item (the ``text_attention`` signal), as
    FastV-style methods here do. Batches of any size (the official code handles one sample).
    """

    threshold: float = 0.6
    min_share: float = 0.1
    layers: int = 4

    info: ClassVar[MethodInfo] = MethodInfo(
        name="framefusion", family="similarity", modalities=("video",), stage="llm", query_aware=True,
        reference="Fu et al., FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large "
                  "Vision Language Models, arXiv:2501.01986")
    requires: ClassVar[tuple[str, ...]] = ("last_attention", "text_attention")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not -1.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold!r}")
        if isinstance(self.min_share, bool) or not isinstance(self.min_share, (int, float)) \
                or not 0.0 <= float(self.min_share) <= 1.0:
            raise ValueError(f"min_share must be in [0, 1], got {self.min_share!r}")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise ValueError(f"layers must be an int >= 1 (the last decoder layer with a stage), got {self.layers!r}")

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        if num_layers < 2:
            raise ValueError(f"FrameFusion needs an LLM of at least 2 layers, got {num_layers}")
        k = self.budget.count(n)
        return [(layer, k) for layer in range(1, min(self.layers, num_layers - 1) + 1)]

    def stage(self, tokens: torch.Tensor, k: int, *, final: int, last: bool, signals: dict,
              context: StageContext) -> CompressOutput | None:
        memo = context.memo
        if last or memo.get("merged"):
            return self._prune(tokens, final, signals)
        out, merged, frame_tokens = self._merge(tokens, final, context)
        if out is not None and out.tokens.shape[1] <= final:
            memo["merged"] = True  # the merge alone met the budget: no pruning stage
            return out
        if merged < self.min_share * max(frame_tokens, 1) or frame_tokens == 0:
            memo["merged"] = True  # the cascade stops; the next stage prunes
        return out

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        """Tensor level (one set of states, no layers): the stages run back to back on ``tokens`` — merges while
        the cascade goes on (at most ``layers - 1``), then pruning to ``k`` by the signals of each remaining
        token's representative."""
        rows = [self._one_row(tokens[i: i + 1], k, layout, {name: sig[i: i + 1] for name, sig in signals.items()})
                for i in range(tokens.shape[0])]
        return CompressOutput(tokens=torch.cat([r.tokens for r in rows]), source=torch.cat([r.source for r in rows]),
                              index=torch.cat([r.index for r in rows]))

    def _one_row(self, tokens: torch.Tensor, k: int, layout: ops.Layout, signals: dict) -> CompressOutput:
        n = tokens.shape[1]
        source = torch.arange(n, device=tokens.device)
        index = torch.arange(n, device=tokens.device)
        context = StageContext(layout, n, index.cpu())
        for step in range(self.layers):
            sub = {name: sig[..., index] for name, sig in signals.items() if name in ("last_attention",
                                                                                       "text_attention")}
            out = self.stage(tokens, k, final=k, last=step == self.layers - 1, signals=sub, context=context)
            if out is not None:
                tokens = out.tokens
                source = torch.where(source >= 0, out.source[0][source.clamp(min=0)], torch.full_like(source, -1))
                index = index[out.index[0]]
                context.index = index.cpu()
            if tokens.shape[1] <= k:
                break
        return CompressOutput(tokens=tokens, source=source[None], index=index[None])

    def _prune(self, tokens: torch.Tensor, k: int, signals: dict) -> CompressOutput | None:
        if k >= tokens.shape[1]:
            return None
        score = received_attention(signals, "text")
        return ops.select(tokens, ops.stable_topk(score, k))

    def _merge(self, tokens: torch.Tensor, final: int, context: StageContext
               ) -> tuple[CompressOutput | None, int, int]:
        """One merging step: ``(output or None, tokens merged, frame tokens)``."""
        m, dev = tokens.shape[1], tokens.device
        prev = self._predecessors(context, m)  # [m] local index of the same position's previous token, or -1
        frame_tokens = int((prev != -2).sum())
        chained = prev >= 0
        if not bool(chained.any()):
            return None, 0, frame_tokens
        safe = prev.clamp(min=0).to(dev)
        sim = F.cosine_similarity(tokens[0].float(), tokens[0, safe].float(), dim=-1)
        sim = sim.masked_fill(~chained.to(dev), float("-inf"))
        merge = (sim >= self.threshold) & chained.to(dev)
        cap = m - final  # never merge below the budget: then only the most similar pairs
        if int(merge.sum()) > cap:
            merge = torch.zeros_like(merge)
            if cap > 0:
                merge[ops.stable_topk(sim[None], cap)[0]] = True
        count = int(merge.sum())
        if count == 0:
            return None, 0, frame_tokens
        target = torch.arange(m, device=dev)
        merge_l, prev_l = merge.tolist(), prev.tolist()
        for j in range(m):  # ascending: a predecessor's own target is known
            if merge_l[j]:
                target[j] = target[prev_l[j]]
        groups = torch.unique(target, sorted=True)
        assign = torch.searchsorted(groups, target)
        return ops.merge(tokens, assign[None], int(groups.numel())), count, frame_tokens

    @staticmethod
    def _predecessors(context: StageContext, m: int) -> torch.Tensor:
        """For each remaining token: the local index of the previous remaining token at the same spatial position
        (same frame grid), ``-1`` for a frame token with none, ``-2`` for a token outside the frames."""
        out = torch.full((m,), -2, dtype=torch.long)
        if context.grid is None:
            return out
        layout = ops.as_layout(context.grid, context.n)
        where: dict[int, tuple[int, int, int]] = {}  # original token -> (h, w, spatial index)
        for start, h, w in ops.visual_frames(layout):
            for p in range(h * w):
                where[start + p] = (h, w, p)
        last: dict[tuple[int, int, int], int] = {}
        for j, orig in enumerate(context.index.tolist()):
            key = where.get(int(orig))
            if key is None:
                continue
            out[j] = last.get(key, -1)
            last[key] = j
        return out
