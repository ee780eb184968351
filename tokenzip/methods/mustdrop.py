"""MustDrop: merge spatially redundant tokens at the vision encoder's output, drop by text attention at prefill, and
optionally prune the visual KV cache while decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..llm.base import LLMCompressor, MultiStageLLM, split_budget
from ..output import CompressOutput

REFERENCE = "Liu et al., Multi-Stage Vision Token Dropping (MustDrop), arXiv:2411.10803"


def _pairs(layout: ops.Layout, window: int) -> list[tuple[int, int]]:
    """4-neighbour pairs ``(i, j)`` (right, then down, in raster order) of tokens in the same ``window x window``
    block of the same frame, over every per-frame grid of ``layout`` (1 x 1 segments have none)."""
    out, offset = [], 0
    for h, w in layout:
        for y in range(h):
            for x in range(w):
                i = offset + y * w + x
                if x + 1 < w and x // window == (x + 1) // window:
                    out.append((i, i + 1))
                if y + 1 < h and y // window == (y + 1) // window:
                    out.append((i, i + w))
        offset += h * w
    return out


@dataclass
class MustDropMerge(Compressor):
    """MustDrop's vision-encoding stage (see :class:`MustDrop`): key tokens by [CLS] attention, then local spatial
    merging of the most similar adjacent tokens in windows that grow until the count is met."""

    window: int = 2
    key_share: float = 0.25

    info: ClassVar[MethodInfo] = MethodInfo(
        name="mustdrop_merge", family="similarity", modalities=("image", "video"), stage="pre_llm",
        query_aware=False, reference=REFERENCE)
    optional: ClassVar[tuple[str, ...]] = ("cls_attention", "keys")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, _ = tokens.shape
        feats = signals.get("keys", tokens).float()
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        cls = signals.get("cls_attention")
        assign = torch.empty(b, n, dtype=torch.long, device=tokens.device)
        side = max(max((max(h, w) for h, w in layout), default=1), 1)
        for row in range(b):
            key = torch.zeros(n, dtype=torch.bool)
            if cls is not None:
                n_key = min(k, math.floor(self.key_share * k + 0.5))
                key[ops.stable_topk(cls[row].float().cpu()[None], n_key)[0]] = True
            parent = list(range(n))

            def root(i: int) -> int:
                while parent[i] != i:
                    parent[i] = parent[parent[i]]
                    i = parent[i]
                return i

            groups, window = n, self.window
            sim_all = (feats[row] @ feats[row].T).cpu()
            while groups > k:
                pairs = [(i, j) for i, j in _pairs(layout, window) if not key[i] and not key[j]]
                if pairs:
                    pt = torch.tensor(pairs)
                    sims = sim_all[pt[:, 0], pt[:, 1]]
                    for p in torch.sort(sims, descending=True, stable=True).indices.tolist():
                        if groups <= k:
                            break
                        ri, rj = root(pairs[p][0]), root(pairs[p][1])
                        if ri != rj:
                            parent[max(ri, rj)] = min(ri, rj)
                            groups -= 1
                if window >= side:
                    break
                window *= 2
            roots = torch.tensor([root(i) for i in range(n)])
            if groups > k:  # grids merged whole and still too many (1 x 1 segments, many frames): drop groups
                uniq = torch.unique(roots)
                members = roots[None, :] == uniq[:, None]
                if cls is not None:
                    score = (members.float() * cls[row].float().cpu()[None]).sum(1)
                else:
                    score = members.sum(1).float()  # the smallest groups go first
                score = torch.where(key[uniq], torch.full_like(score, float("inf")), score)
                keep = uniq[ops.stable_topk(score[None], k)[0]]
                roots = torch.where(torch.isin(roots, keep), roots, torch.full_like(roots, -1))
            uniq = torch.unique(roots[roots >= 0])  # ascending: group slots ordered by first member
            slot = torch.full((n,), -1, dtype=torch.long)
            slot[roots >= 0] = torch.searchsorted(uniq, roots[roots >= 0])
            assign[row] = slot.to(tokens.device)
        return ops.merge(tokens, assign, k)


@dataclass
class MustDropFilter(LLMCompressor):
    """MustDrop's prefill and decoding stages inside the LLM (see :class:`MustDrop`)."""

    layer: int | None = None
    decode: bool = False
    tau: float = 0.1
    decode_min: float = 0.5

    info: ClassVar[MethodInfo] = MethodInfo(
        name="mustdrop_filter", family="query", modalities=("image", "video"), stage="llm", query_aware=True,
        reference=REFERENCE)
    requires: ClassVar[tuple[str, ...]] = ("last_attention", "text_attention")

    def stage_layer(self, num_layers: int) -> int:
        if num_layers < 2:
            raise ValueError(f"mustdrop needs an LLM of at least 2 layers, got {num_layers}")
        return min(2, num_layers - 1) if self.layer is None else self.check_layer(self.layer, num_layers)

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        return [(self.stage_layer(num_layers), self.budget.count(n))]

    def decode_layer(self, num_layers: int) -> int | None:
        return self.stage_layer(num_layers) if self.decode else None

    def decode_keep(self, scores: torch.Tensor, n: int) -> torch.Tensor | None:
        m = scores.numel()
        floor = min(m, max(1, math.floor(self.decode_min * self.budget.count(n) + 0.5)))
        above = int((scores.float() >= self.tau / max(m, 1)).sum())
        keep = max(floor, above)
        if keep >= m:
            return None
        return torch.sort(ops.stable_topk(scores[None].float(), keep)[0]).values

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        att = signals.get("text_attention")
        rows = []
        for row in range(tokens.shape[0]):
            if att is not None and att.shape[1] > 0:
                glob, indiv = att[row].float().mean(0), att[row].float().max(0).values
            else:
                glob = indiv = signals["last_attention"][row].float()
            rows.append(dual_attention_keep(glob, indiv, k))
        return ops.select(tokens, torch.stack(rows).to(tokens.device))


def dual_attention_keep(glob: torch.Tensor, indiv: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` tokens taken alternately from the global ranking (mean text attention) and the individual one (max
    over text tokens), global first, each skipping what the other already took (ties: the earlier token)."""
    orders = [torch.sort(glob, descending=True, stable=True).indices.tolist(),
              torch.sort(indiv, descending=True, stable=True).indices.tolist()]
    taken: list[int] = []
    seen: set[int] = set()
    pos = [0, 0]
    turn = 0
    while len(taken) < k:
        order = orders[turn]
        while order[pos[turn]] in seen:
            pos[turn] += 1
        taken.append(order[pos[turn]])
        seen.add(taken[-1])
        turn = 1 - turn
    return torch.tensor(taken, dtype=torch.long)


@dataclass
class MustDrop(MultiStageLLM):
    """MustDrop ("Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model", Liu et al.,
    arXiv:2411.10803): tokens are judged over their whole lifecycle, one registered method over three stages of
    tokenzip's machinery (installed as a ``tz.compose`` pipeline of its parts, :class:`~tokenzip.llm.base.
    MultiStageLLM`):

    1. **Vision encoding** (stage ``"pre_llm"``, on the vision encoder's output): a *key token set* (the
       ``key_share`` of the item's budget with the highest [CLS] attention, ``cls_attention``) is never merged;
       *local spatial merging* joins spatially adjacent tokens (4-neighbours inside ``window x window`` blocks,
       default 2) with the highest cosine similarity (of the encoder's ``keys``, else of the features), most similar
       first (union-find; a group is the plain mean of its members), until the count is met; if the blocks are
       merged whole first, the windows double (4, 8, ...) until they cover the grid.
    2. **Prefill** (stage ``"llm"``, before decoder layer ``layer``, default 2 clamped to ``L - 1``):
       *dual-attention filtering*: the text tokens after the item attend to its tokens in layer ``layer - 1``; the
       *global* score is the mean over those rows, the *individual* score the max (a token one text token looks at
       hard survives); the two rankings are taken alternately, global first, to exactly the budget.
    3. **Decoding** (``decode=True``; decode-time KV pruning from ``layer`` on): the *output-aware cache policy*:
       at each decoding step the item's visual entries that the current token attends to less than ``tau`` (0.1)
       of a uniform share (``tau / m``) are freed, never going below ``decode_min`` (0.5) of the prefill count.

    Budget (``retain``/``tokens``): the count after the prefill stage (every layer from ``layer`` on sees exactly
    it), split between stages 1 and 2 by ``share`` (default 0.5) on a log scale
    (:func:`tokenzip.llm.base.split_budget`): ``retain=r`` keeps ``r ** share`` at stage 1 and ``r ** (1 - share)``
    of that at stage 2 (``final_count`` gives the exact count); ``tokens=k`` brings ``round(N ** (1 - share) *
    k ** share)`` to the LLM and ends on exactly ``k``. Decoding (stage 3) then only frees entries.

    Departures: the paper merges by a similarity threshold and drops by attention thresholds (adaptive counts);
    here each stage meets its count exactly (most similar / most attended first). The merging code we read (the
    llmc reproduction) scores each whole 2 x 2 window by the mean pairwise cosine similarity of its tokens and merges
    the windows over the threshold 4 -> 1 (size-weighted); here 4-neighbour pairs are joined one at a time, so a
    window merges whole only when all its pairs rank high, and any count can be met. The key set is protected at
    stage 1 only (the LLM-stage part cannot know which tokens were keys: the pipeline hands the LLM tokens, not
    labels). Stage 1 runs on the vision encoder's output rather than between its layers. The decode policy is
    opt-in (``decode=False`` by default) because the runner refuses decode-time KV pruning on sliding-window
    decoders, and scores with the current token's attention in the layer before ``layer`` (mean over heads). Kept
    tokens keep their original positions; ties go to the earlier token; per-item budget. Video: each frame's grid
    is merged on its own and a clip is one item at the LLM stage (an application to video).
    """

    window: int = 2
    key_share: float = 0.25
    layer: int | None = None
    share: float = 0.5
    decode: bool = False
    tau: float = 0.1
    decode_min: float = 0.5

    info: ClassVar[MethodInfo] = MethodInfo(
        name="mustdrop", family="query", modalities=("image", "video"), stage="llm", query_aware=True,
        reference=REFERENCE)

    def __post_init__(self) -> None:
        for name in ("window",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"{name} must be an int >= 2, got {v!r}")
        for name, lo, hi in (("key_share", 0.0, 1.0), ("share", 0.0, 1.0), ("tau", 0.0, math.inf),
                             ("decode_min", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise ValueError(f"layer must be None or an int >= 1, got {self.layer!r}")
        if not isinstance(self.decode, bool):
            raise TypeError(f"decode must be a bool, got {type(self.decode).__name__}")
        super().__post_init__()

    def build_parts(self) -> tuple[Compressor, LLMCompressor]:
        first, second = split_budget(self.budget, float(self.share))
        merge = MustDropMerge(retain=1.0, window=self.window, key_share=float(self.key_share))
        merge.budget = first
        drop = MustDropFilter(retain=1.0, layer=self.layer, decode=self.decode, tau=float(self.tau),
                              decode_min=float(self.decode_min))
        drop.budget = second
        return merge, drop
