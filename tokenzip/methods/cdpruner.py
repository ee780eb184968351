"""CDPruner: keep the subset of visual tokens of maximal conditional diversity (a DPP weighted by relevance)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput

EPS = 1e-6


def instruction_relevance(projected: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` relevance of each visual token of one sample to its instruction: the mean cosine similarity of the
    token (``projected`` ``[N, D]``) to the real text tokens (``text`` ``[T, D]`` where ``mask``), min-max normalised
    to ``(0, 1]`` as ``(r - min + eps) / (max - min + eps)``; every token gets 1 when there is no text or all are
    equal (the kernel is then the plain similarity: an unconditional DPP)."""
    valid = mask.bool()
    if not bool(valid.any()):
        return torch.ones(projected.shape[0], device=projected.device)
    r = (F.normalize(projected.float(), dim=-1) @ F.normalize(text[valid].float(), dim=-1).T).mean(dim=1)
    return (r - r.min() + EPS) / (r.max() - r.min() + EPS)


def greedy_dpp_map(kernel: torch.Tensor, k: int, fallback: torch.Tensor, floor: float = 1e-9,
                   tie: float = 1e-6) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel ``kernel`` ``[N, N]`` (positive semi-definite), ``k`` picks in order,
    by the incremental Cholesky update of Chen et al. ("Fast Greedy MAP Inference for Determinantal Point Process to
    Improve Recommendation Diversity", NeurIPS 2018): each pick is the item of largest marginal gain ``d_j^2`` (the
    log-determinant gain), ties to the earliest: gains within ``tie`` times the largest diagonal entry of the best one
    count as tied (duplicated tokens have equal gains only up to rounding, and features that differ by float32 rounding,
    e.g. SDPA vs eager attention upstream, must not pick differently). When every remaining gain is at most ``floor``
    times the largest diagonal entry (the kernel's rank is exhausted, e.g. duplicated tokens or fewer feature dimensions
    than picks: what is left is rounding noise), the remaining picks go by ``fallback`` ``[N]`` (higher first, ties to
    the earliest). Computed in float64."""
    n = kernel.shape[0]
    kernel = kernel.double()
    gains = torch.diagonal(kernel).clone()
    scale = float(gains.max().clamp(min=0))
    floor, tie = floor * scale, tie * scale
    chol = torch.zeros(k, n, dtype=kernel.dtype, device=kernel.device)
    picked = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    order: list[int] = []
    for i in range(k):
        masked = gains.masked_fill(picked, float("-inf"))
        j = int((masked >= masked.max() - tie).nonzero()[0])  # the first of the (near-)maxima
        if float(masked[j]) <= floor:
            rest = ops.stable_topk(fallback.float().masked_fill(picked, float("-inf")).unsqueeze(0), k - i)[0]
            order.extend(int(r) for r in rest)
            break
        e = (kernel[j] - chol[:i, j] @ chol[:i]) / torch.sqrt(gains[j])
        chol[i] = e
        gains = gains - e * e
        picked[j] = True
        order.append(j)
    return torch.tensor(order, dtype=torch.long, device=kernel.device)


@dataclass
class CDPruner(Compressor):
    """CDPruner ("Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs", Zhang
    et al., NeurIPS 2025, arXiv:2506.10967).

    Before the LLM, each image keeps the ``k`` tokens that maximise the determinant of the conditional kernel
    ``L~ = diag(r) L diag(r)``: ``L`` is the cosine similarity of the visual tokens, ``r`` their relevance to the
    instruction (the mean cosine similarity to the text tokens, min-max normalised; :func:`instruction_relevance`).
    The MAP subset is found greedily with the fast incremental Cholesky update (:func:`greedy_dpp_map`), as in the
    paper. Similarity is computed on the tokens being compressed (the vision encoder's features, as the paper's
    ``L``), relevance on ``projected`` (those tokens in the LLM's input space) against the prompt's ``text``
    embeddings (real tokens per ``text_mask``).

    Departures: the paper and the authors' LLaVA code embed the instruction with the CLIP text tower and compare it
    with CLIP's image embeddings; we compare the prompt's token embeddings in the LLM input space with the projected
    tokens (no second text encoder; the authors do the same for models without a CLIP text tower). The authors' code
    negates the similarity before normalising it (``relevance = (-relevance).mean(-1)``); we follow the paper, where a
    token more similar to the instruction is more relevant. When the kernel's rank is exhausted before ``k`` picks
    (duplicated tokens), the remaining picks go to the most relevant tokens left (the authors' loop would divide by
    a non-positive gain). Per-item budget. No text: every relevance is 1 (a plain DPP). Ties go to the earliest
    token.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="cdpruner", family="query", modalities=("image",), stage="pre_llm", query_aware=True,
        reference="Zhang et al., Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in "
                  "MLLMs (CDPruner), arXiv:2506.10967")
    requires: ClassVar[tuple[str, ...]] = ("projected", "text", "text_mask")

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
            r = instruction_relevance(proj[i], text[i], mask[i])
            unit = F.normalize(tokens[i].double(), dim=-1)
            kernel = r.double()[:, None] * (unit @ unit.T) * r.double()[None, :]
            rows.append(greedy_dpp_map(kernel, k, r))
        return ops.select(tokens, torch.stack(rows))
