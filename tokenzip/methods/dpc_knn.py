"""DPC-KNN: density-peak clustering with k-nearest-neighbour density, then cluster means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def dpc_knn_centres(x: torch.Tensor, k: int, neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster centres ``[k]`` and the ``[N, N]`` distance matrix for one sample's tokens ``x`` ``[N, D]``."""
    n, d = x.shape
    x = x.float()
    dist = torch.cdist(x, x) / d ** 0.5
    m = min(neighbors, n)
    near = torch.topk(dist, m, dim=1, largest=False).values  # includes the token itself (distance 0)
    density = torch.exp(-(near ** 2).mean(dim=1))
    # "higher density" as a strict total order: denser, or as dense and earlier (no random jitter)
    pos = torch.arange(n, device=x.device)
    higher = (density.unsqueeze(0) > density.unsqueeze(1)) | (
        (density.unsqueeze(0) == density.unsqueeze(1)) & (pos.unsqueeze(0) < pos.unsqueeze(1)))
    far = dist.max()
    delta = torch.where(higher, dist, far).min(dim=1).values  # the densest token gets the largest distance
    return ops.stable_topk(density * delta, k), dist


@dataclass
class DpcKnn(Compressor):
    """Merge tokens into ``k`` clusters found by density-peak clustering (DPC-KNN).

    As used by Chat-UniVi ("Chat-UniVi: Unified Visual Representation Empowers Large Language Models with Image and
    Video Understanding", arXiv:2311.08046) and TCFormer ("Not All Tokens Are Equal: Human-centric Visual Analysis
    via Token Clustering Transformer", arXiv:2204.08680): local density ``exp(-mean squared distance to the
    `neighbors` nearest tokens)`` (the token itself included, distances scaled by ``1/sqrt(D)``), distance to the
    nearest denser token, the ``k`` tokens with the largest ``density * distance`` become centres, every token
    joins its nearest centre and each cluster is averaged. Departures/choices: the reference code breaks density
    ties with random noise; we break them by position (earlier counts as denser) so the result is deterministic.
    Chat-UniVi uses a plain mean (TCFormer an importance-weighted one); we use the plain mean. Ties in the centre
    assignment go to the earliest centre.
    """

    neighbors: int = 5
    info: ClassVar[MethodInfo] = MethodInfo(
        name="dpc_knn", family="similarity", modalities=("image", "audio"), stage="pre_llm",
        query_aware=False, reference="DPC-KNN clustering as in Chat-UniVi, arXiv:2311.08046, and TCFormer, "
                                     "arXiv:2204.08680")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.neighbors, bool) or not isinstance(self.neighbors, int) or self.neighbors < 1:
            raise ValueError(f"neighbors must be an int >= 1, got {self.neighbors!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        assigns = []
        for i in range(tokens.shape[0]):
            centres, dist = dpc_knn_centres(tokens[i], k, self.neighbors)
            centres = torch.sort(centres).values
            slot = torch.argmin(dist[:, centres], dim=1)  # first minimum: the earliest centre
            slot[centres] = torch.arange(k, device=tokens.device)
            assigns.append(slot)
        return ops.merge(tokens, torch.stack(assigns), k)
