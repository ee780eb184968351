"""FOLDER: fold the tokens by repeated bipartite matching in the last block(s) of the vision encoder."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..encoder_stage import InEncoder
from ..output import CompressOutput

REFERENCE = "FOLDER: Accelerating Multi-modal Large Language Models with Enhanced Performance, arXiv:2501.02430"


@dataclass
class FolderMerge(Compressor):
    """FOLDER's merge rule on one set of tokens (the step :class:`Folder` runs inside the encoder; not registered
    on its own). See :class:`Folder` for the paper.

    Rounds of bipartite soft matching ("fold"): tokens alternate into sets A and B; each A token links to the B token
    whose key is most similar (cosine), minus ``alpha * 30 *`` its own [CLS] attention (Turbo's informativity,
    arXiv:2407.11717: an A token the [CLS] token attends to is kept out of merges), and the strongest links merge.
    A round removes at most half of the tokens, so a block that must remove more folds again on the merged tokens,
    until exactly ``k`` remain. Merged tokens are plain averages of the input tokens they stand for (their key and
    [CLS] attention: the size-weighted mean and the sum of their members'), the survivors stay in input order.
    Ties go to the earliest token.
    """

    alpha: float = 5.0

    info: ClassVar[MethodInfo] = MethodInfo(name="folder_merge", family="similarity", modalities=("image", "audio"),
                                            stage="pre_llm", query_aware=False, reference=REFERENCE)
    optional: ClassVar[tuple[str, ...]] = ("keys", "cls_attention")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0 or \
                math.isinf(self.alpha):
            raise ValueError(f"alpha must be a finite float >= 0, got {self.alpha!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        metric = signals.get("keys", tokens)
        cls = signals.get("cls_attention")
        groups = [self._groups(metric[i].float(), None if cls is None else cls[i].float(), k)
                  for i in range(tokens.shape[0])]
        return ops.merge(tokens, torch.stack(groups), k)

    def _groups(self, metric: torch.Tensor, cls: torch.Tensor | None, k: int) -> torch.Tensor:
        """Group id ``[N]`` in ``[0, k)`` of every token after the folding rounds."""
        n = metric.shape[0]
        dev = metric.device
        group = torch.arange(n, device=dev)  # input token -> current slot
        key_sum = metric.clone()  # per slot: the sum of its members' keys
        cls_sum = torch.zeros(n, device=dev) if cls is None else cls.clone()  # per slot: its members' [CLS] attention
        size = torch.ones(n, device=dev)
        while key_sum.shape[0] > k:
            cur = key_sum.shape[0]
            r = min(cur - k, cur // 2)
            a_pos, b_pos = torch.arange(0, cur, 2, device=dev), torch.arange(1, cur, 2, device=dev)
            unit = F.normalize(key_sum / size.unsqueeze(-1), dim=-1)
            scores = unit[a_pos] @ unit[b_pos].T - self.alpha * 30.0 * cls_sum[a_pos].unsqueeze(-1)
            best, partner = scores.max(dim=-1)  # ties: the earliest B token
            merged = torch.sort(best, descending=True, stable=True).indices[:r]  # ties: the earliest A token
            dest = torch.arange(cur, device=dev)
            dest[a_pos[merged]] = b_pos[partner[merged]]
            alive = torch.ones(cur, dtype=torch.bool, device=dev)
            alive[a_pos[merged]] = False
            slot_of = torch.cumsum(alive.long(), 0) - 1  # survivors keep their input order
            step = slot_of[dest]  # current slot -> slot after this round
            group = step[group]
            key_sum = torch.zeros(cur - r, key_sum.shape[1], device=dev).index_add_(0, step, key_sum)
            cls_sum = torch.zeros(cur - r, device=dev).index_add_(0, step, cls_sum)
            size = torch.zeros(cur - r, device=dev).index_add_(0, step, size)
        return group


class Folder(InEncoder):
    """FOLDER ("FOLDER: Accelerating Multi-modal Large Language Models with Enhanced Performance", Wang et al.,
    arXiv:2501.02430): all of the reduction in the last block(s) of the vision encoder, by folding.

    The paper's analysis (reduction impact, propagation, aggregation) finds that merging late in the encoder loses
    least, since fewer blocks propagate the error, and that averaging is the aggregation to use; it therefore
    concentrates aggressive merging in the final blocks and "folds" the tokens with repeated bipartite soft matching
    where ToMe would stop at half of them per block (:class:`FolderMerge`: the matching on the attention keys, with
    the [CLS]-attention informativity term of the authors' LLaVA-1.5 code, ``alpha=5``; ``alpha=0`` is their
    simplified ``merge_features``, plain ToMe matching). Merged tokens get proportional attention in the blocks
    after the merge. ``retain``/``tokens`` count the tokens that reach the LLM, as for every method.

    Here it is ``tz.InEncoder(FolderMerge(...), layer=("last", blocks))``: ``blocks=1`` (default) folds once,
    before the last block the adapter runs (for LLaVA the feature layer the LLM reads); ``blocks=b`` spreads the
    reduction over the last ``b`` blocks with a constant keep ratio. Departures: the authors' code merges inside the
    last block read (after its attention, before its MLP) and takes keys and [CLS] attention from that block; here
    the fold comes just before that block (its attention already sees the merged tokens) and the signals come from
    the block before the cut. The authors merge with a fixed ``r`` per model; here the budget is met exactly. Audio
    (Whisper's encoder, whose ``cls_attention`` is the mean attention a frame receives) is an extension the paper
    does not cover.
    """

    info: ClassVar[MethodInfo] = MethodInfo(name="folder", family="similarity", modalities=("image", "audio"),
                                            stage="encoder", query_aware=False, reference=REFERENCE)

    def __init__(self, retain: float | None = None, tokens: int | None = None, blocks: int = 1, alpha: float = 5.0):
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks must be an int >= 1 (the last blocks to merge in), got {blocks!r}")
        self.blocks, self.alpha = blocks, alpha
        super().__init__(FolderMerge(retain=retain, tokens=tokens, alpha=alpha), layer=("last", blocks))

    def __repr__(self) -> str:
        return f"Folder({self.budget}, blocks={self.blocks}, alpha={self.alpha:g})"
