"""TopV: inside the LLM, keep the visual tokens that carry the most mass in an optimal transport to the text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMCompressor
from ..output import CompressOutput

# softmax temperature (over the item's visual tokens, on cosine similarity) that places a text token in the image:
# its spatial anchor is the similarity-weighted mean of the visual tokens' coordinates
ANCHOR_TEMPERATURE = 0.1


def token_coordinates(layout: ops.Layout, device: torch.device | None = None) -> torch.Tensor:
    """``[N, 2]`` (row, column) of every token of ``layout`` in its own frame's grid, each in ``(0, 1)``: the centre
    of the token's cell, ``((r + 0.5) / h, (c + 0.5) / w)``. Every per-frame grid of the layout (a video frame, an
    AnyRes crop grid, a base view, a 1 x 1 class or newline token, the ``1 x N`` row of a layout without a grid)
    spans the same unit square, so the image centre is ``(0.5, 0.5)`` in each."""
    parts = []
    for _, h, w in layout.frames():
        rows = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        cols = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        parts.append(torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2))
    return torch.cat(parts)


def unbalanced_sinkhorn(cost: torch.Tensor, epsilon: float, rho: float, iterations: int) -> torch.Tensor:
    """Entropic optimal transport plan ``[N, T]`` for ``cost`` ``[N, T]`` from ``N`` sources of uniform mass
    ``1 / N`` to ``T`` targets of uniform mass ``1 / T``, with the source marginal relaxed by a KL penalty of weight
    ``rho`` and the target marginal exact: ``min <P, C> - epsilon * H(P) + rho * KL(P 1 | a)`` s.t. ``P^T 1 = b``.
    Log-domain Sinkhorn: ``iterations`` rounds of the source potential update (damped by ``rho / (rho + epsilon)``,
    the KL relaxation) then the exact target update, so the columns sum to ``1 / T`` and the plan to 1; sources
    that are cheap to transport from end up with more than ``1 / N``."""
    n, t = cost.shape
    c = cost.double()
    log_a = torch.full((n,), -math.log(n), dtype=c.dtype, device=c.device)
    log_b = torch.full((t,), -math.log(t), dtype=c.dtype, device=c.device)
    f = torch.zeros(n, dtype=c.dtype, device=c.device)
    g = torch.zeros(t, dtype=c.dtype, device=c.device)
    damp = rho / (rho + epsilon)
    for _ in range(iterations):
        f = damp * epsilon * (log_a - torch.logsumexp((g[None, :] - c) / epsilon, dim=1))
        g = epsilon * (log_b - torch.logsumexp((f[:, None] - c) / epsilon, dim=0))
    return torch.exp((f[:, None] + g[None, :] - c) / epsilon)


def topv_cost(tokens: torch.Tensor, targets: torch.Tensor, coords: torch.Tensor,
              target_coords: torch.Tensor | None, weights: tuple[float, float, float]) -> torch.Tensor:
    """The ``[N, T]`` visual-aware cost from the item's ``N`` visual tokens ``[N, D]`` to ``T`` targets ``[T, D]``:
    ``weights[0] * (1 - cos) / 2`` (feature dissimilarity, in ``[0, 1]``) ``+ weights[1] *`` the distance between
    the source's coordinates and the target's (``/ sqrt 2``, in ``[0, 1]``) ``+ weights[2] *`` the source's distance
    from the image centre (``/ sqrt(1/2)``, in ``[0, 1]``). ``coords`` ``[N, 2]`` are the sources' coordinates
    (:func:`token_coordinates`); ``target_coords`` ``[T, 2]`` the targets' (``None``: text targets, placed at their
    spatial anchor, the softmax(cos / :data:`ANCHOR_TEMPERATURE`)-weighted mean of the sources' coordinates)."""
    sim = F.normalize(tokens.float(), dim=-1) @ F.normalize(targets.float(), dim=-1).T  # [N, T]
    feature = (1.0 - sim) / 2.0
    if target_coords is None:
        target_coords = torch.softmax(sim / ANCHOR_TEMPERATURE, dim=0).T @ coords  # [T, 2]
    relative = torch.cdist(coords, target_coords) / math.sqrt(2.0)
    centre = (coords - 0.5).norm(dim=-1, keepdim=True) / math.sqrt(0.5)
    w_feature, w_spatial, w_centre = weights
    return w_feature * feature + w_spatial * relative + w_centre * centre


def recovery_count(k: int, recovery: float) -> int:
    """Of ``k`` kept tokens, how many are recovered evenly spaced: ``round(recovery * k)`` (half up)."""
    return min(k, math.floor(recovery * k + 0.5))


def topv_select(importance: torch.Tensor, k: int, recovered: int) -> torch.Tensor:
    """The ``k`` kept indices (unordered) of one item from its ``importance`` ``[N]``: the ``k - recovered`` most
    important (ties: the earlier token), then ``recovered`` tokens evenly spaced (:func:`ops.evenly_spaced`) over the
    others in token order."""
    top = ops.stable_topk(importance.unsqueeze(0), k - recovered)[0]
    if recovered == 0:
        return top
    rest = torch.ones(importance.shape[0], dtype=torch.bool, device=importance.device)
    rest[top] = False
    others = torch.nonzero(rest).squeeze(1)
    picks = torch.tensor(ops.evenly_spaced(others.shape[0], recovered), dtype=torch.long, device=others.device)
    return torch.cat([top, others[picks]])


def _check_number(name: str, value: object, *, low: float, low_open: bool, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be {bound}, got {value!r}")


@dataclass
class TopV(LLMCompressor):
    """TopV ("TopV: Compatible Token Pruning with Inference Time Optimization for Fast and Low-Memory Multimodal
    Vision Language Model", Yang et al., arXiv:2503.18278, CVPR 2025).

    Algorithm. Layers ``< layer`` (default 2, the paper's L_i = 2; ``None`` = 2 clamped to ``L - 1``) run on the
    full sequence; before decoder layer ``layer``, once, in prefill, each item solves an entropic optimal transport
    problem from its visual tokens (sources) to the real text tokens after it (targets), both the hidden states
    entering ``layer`` (no attention weights: the model keeps running SDPA / FlashAttention). The cost of moving
    source ``i`` to target ``j`` (:func:`topv_cost`) is

    ``feature_weight * (1 - cos(v_i, t_j)) / 2 + spatial_weight * |p_i - p_j| / sqrt 2
    + centre_weight * |p_i - (1/2, 1/2)| / sqrt(1/2)``

    (feature similarity, relative spatial distance, absolute central distance; defaults 1.0, 0.5, 0.2), where
    ``p_i`` is the token's (row, column) in its grid scaled to the unit square (:func:`token_coordinates`) and
    ``p_j`` a text token's spatial anchor: the softmax(cos / 0.1)-weighted mean of the visual tokens' coordinates.
    The plan comes from log-domain Sinkhorn (:func:`unbalanced_sinkhorn`: ``epsilon`` = 0.1 entropic
    regularisation, source marginal uniform but relaxed by a KL penalty ``rho`` = 0.1, target marginal uniform and
    exact, ``iterations`` = 20). A visual token's importance is its transported row mass. The item keeps its
    ``k - r`` most important tokens plus ``r = round(recovery * k)`` (``recovery`` = 0.2, half up) tokens evenly
    spaced over the others in token order (the paper's uniform recovery "to maintain structural integrity"), exactly
    ``k`` = its budget, which keep their original positions; the rest of the LLM (and the KV cache) runs on them.

    Departures and unverified choices. The paper's method section could not be read here (only its abstract and
    the Figure 1 caption: sources = the layer's input visual tokens, targets = the layer's post-LN outputs, a cost
    of feature similarity + relative spatial distance + absolute central distance, Sinkhorn, a contribution matrix
    giving importance, uniform recovery of some pruned tokens, L_i = 2, pruning once in prefill). So every one of the
    following is this implementation's choice, not checked against the paper:

    - targets are the text tokens after the item, taken (like the sources) from the hidden states entering
      ``layer``; the paper takes its targets from layer L_i's output after its post-attention LayerNorm (tokenzip's
      LLM stage hands methods the hidden states entering a layer, not a layer's post-LN output);
    - the cost weights 1.0 / 0.5 / 0.2, the form of each term (``(1 - cos) / 2``; Euclidean distances on
      unit-square coordinates, normalised to ``[0, 1]``) and their sum;
    - the relative spatial distance to a text target, which has no position in the image: the distance to the
      target's spatial anchor (similarity-weighted mean of the visual coordinates, temperature 0.1);
    - coordinates per per-frame grid of the item's layout: every frame of a clip, the base view and the AnyRes crop
      grid of an image each span the unit square with the centre at (1/2, 1/2); a layout without a 2-D grid (a
      ``1 x N`` row, e.g. tensor-level calls on a non-square N) gives row 1/2 and the column along the row; newline
      marker columns and 1 x 1 class/newline tokens are placed like any other cell;
    - the OT problem: uniform marginals, KL relaxation of the source marginal only, ``epsilon`` = 0.1,
      ``rho`` = 0.1, 20 iterations (ending with the exact target update), computed in float64;
    - importance = the plan's row sums (the source token's total contribution);
    - the recovery: ``round(0.2 * k)`` tokens inside the budget (so exactly ``k`` stay), evenly spaced over the
      pruned tokens in token order (:func:`ops.evenly_spaced`, the centres of equal bins);
    - an item that no real text token follows has one target, the mean of its own visual tokens (placed at its
      anchor like a text token): a token is then important when it is typical of the item and near the anchor and
      the centre (one target keeps the cost ``[N, 1]``, where transporting to all N tokens would be N x N);
    - per-item budget (``retain``/``tokens`` of each image; how the paper counts its budget could not be read);
      ties go to the earlier token. Video: each clip is one item whose tokens are treated like an image's, every
      frame its own grid (an application to video tokens, as FastV's and DART's here; the budget is per clip).
    """

    layer: int | None = None
    epsilon: float = 0.1
    rho: float = 0.1
    iterations: int = 20
    feature_weight: float = 1.0
    spatial_weight: float = 0.5
    centre_weight: float = 0.2
    recovery: float = 0.2

    info: ClassVar[MethodInfo] = MethodInfo(
        name="topv", family="query", modalities=("image", "video"), stage="llm", query_aware=True,
        reference="Yang et al., TopV: Compatible Token Pruning with Inference Time Optimization for Fast and "
                  "Low-Memory Multimodal Vision Language Model, arXiv:2503.18278")
    requires: ClassVar[tuple[str, ...]] = ("text",)
    optional: ClassVar[tuple[str, ...]] = ("text_mask",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise ValueError(f"layer must be an int >= 1, got {self.layer!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {self.iterations!r}")
        _check_number("epsilon", self.epsilon, low=0.0, low_open=True)
        _check_number("rho", self.rho, low=0.0, low_open=True)
        for name in ("feature_weight", "spatial_weight", "centre_weight"):
            _check_number(name, getattr(self, name), low=0.0, low_open=False)
        _check_number("recovery", self.recovery, low=0.0, low_open=False, high=1.0)

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        layer = min(2, num_layers - 1) if self.layer is None else self.layer
        return [(self.check_layer(layer, num_layers), self.budget.count(n))]

    def importance(self, tokens: torch.Tensor, text: torch.Tensor, layout: ops.Layout) -> torch.Tensor:
        """``[N]`` importance of one item's visual tokens ``[N, D]`` given the real text tokens ``[T, D]`` after it
        (``T`` may be 0: the one target is then the mean of the item's tokens): the row mass of the transport plan."""
        coords = token_coordinates(layout, tokens.device)
        targets = text if text.shape[0] > 0 else tokens.float().mean(dim=0, keepdim=True)
        cost = topv_cost(tokens, targets, coords, None, self._weights())
        return unbalanced_sinkhorn(cost, self.epsilon, self.rho, self.iterations).sum(dim=1)

    def _weights(self) -> tuple[float, float, float]:
        return float(self.feature_weight), float(self.spatial_weight), float(self.centre_weight)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        text = signals["text"]
        if text.dim() != 3 or text.shape[-1] != tokens.shape[-1]:
            raise ValueError(f"text must be [B, T, {tokens.shape[-1]}] (hidden states like the tokens), got "
                             f"{tuple(text.shape)}")
        mask = signals.get("text_mask")
        if mask is not None and tuple(mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be {tuple(text.shape[:2])} (one flag per text token), got "
                             f"{tuple(mask.shape)}")
        recovered = recovery_count(k, self.recovery)
        rows = []
        for i in range(tokens.shape[0]):
            real = text[i] if mask is None else text[i][mask[i].bool()]
            rows.append(topv_select(self.importance(tokens[i], real, layout), k, recovered))
        return ops.select(tokens, torch.stack(rows))
