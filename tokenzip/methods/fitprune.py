"""FitPrune: a per-layer pruning recipe fitted to attention statistics from a few calibration inputs."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMCompressor, LLMScorer
from ..output import CompressOutput

RECIPE_FORMAT = "tokenzip.fitprune.recipe/1"


@dataclass(frozen=True)
class FitPruneRecipe:
    """A FitPrune recipe: ``keep[l]`` is the share of an item's visual tokens that enter decoder layer ``l`` of a
    ``num_layers``-layer LLM (``keep[0] == 1``, non-increasing), fitted by :meth:`fit` for an average share
    ``target`` over the layers (the compute budget). ``samples`` counts the calibration items it was fitted on."""

    num_layers: int
    keep: tuple[float, ...]
    target: float
    samples: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 2:
            raise ValueError(f"num_layers must be an int >= 2, got {self.num_layers!r}")
        keep = tuple(float(v) for v in self.keep)
        if len(keep) != self.num_layers:
            raise ValueError(f"keep must have one share per layer ({self.num_layers}), got {len(keep)}")
        if keep[0] != 1.0 or any(not 0.0 < v <= 1.0 for v in keep) or any(b > a for a, b in zip(keep, keep[1:])):
            raise ValueError(f"keep must start at 1 and be non-increasing shares in (0, 1], got {list(keep)}")
        object.__setattr__(self, "keep", keep)

    # ---- fitting ------------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, stats: Iterable[torch.Tensor], target: float) -> "FitPruneRecipe":
        """Fit a recipe to calibration statistics for the average share ``target`` in (0, 1].

        ``stats``: one tensor ``[L - 1, n]`` per calibration item (an image or clip of ``n`` tokens in an ``L``-layer
        LLM): row ``j`` is the attention the text tokens after the item pay each of its tokens in decoder layer
        ``j`` (what :meth:`FitPrune.calibrate` collects). For a threshold ``alpha`` (the attention mass a layer may
        lose), a layer keeps the fewest tokens holding ``1 - alpha`` of its attention to the item, as a share of
        ``n`` averaged over the items; the share entering layer ``l`` is the smallest over layers ``< l`` (a pruned
        token stays pruned). Bisection finds the smallest ``alpha`` whose average share over all ``L`` layers (layer
        0 sees every token) is at most ``target``."""
        rows = [s.detach().float().cpu() for s in stats]
        if not rows:
            raise ValueError("stats is empty: calibrate on at least one input with media")
        depth = rows[0].shape[0]
        for s in rows:
            if s.dim() != 2 or s.shape[0] != depth or s.shape[1] < 1:
                raise ValueError(f"stats must be tensors [L - 1, n] with the same L - 1 ({depth}), got "
                                 f"{tuple(s.shape)}")
            if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
                raise ValueError("stats must be finite, non-negative attention values")
        if depth < 1:
            raise ValueError("stats need at least one layer row (an LLM of at least 2 layers)")
        num_layers = depth + 1
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
            raise ValueError(f"target must be in (0, 1], got {target!r}")
        floor = 1.0 / num_layers
        if float(target) < floor:
            raise ValueError(f"target {target} is below {floor:.4g}: layer 0 of a {num_layers}-layer LLM sees every "
                             f"token, so the average share cannot go under 1 / {num_layers}")
        # per item and layer, the attention mass held by its top-m tokens (m = 1..n), normalised
        curves = []
        for s in rows:
            mass = torch.sort(s, dim=1, descending=True).values.cumsum(1)
            curves.append(mass / mass[:, -1:].clamp(min=1e-30))

        def shares(alpha: float) -> list[float]:
            need = torch.zeros(depth)
            for c in curves:  # fewest tokens holding 1 - alpha of the mass (a tolerance for float round-off)
                count = (c < (1.0 - alpha) - 1e-9).sum(1) + 1
                need += count.clamp(max=c.shape[1]).float() / c.shape[1]
            need /= len(curves)
            keep = [1.0]
            for j in range(depth):
                keep.append(min(keep[-1], float(need[j])))
            return keep

        def average(alpha: float) -> float:
            return sum(shares(alpha)) / num_layers

        lo, hi = 0.0, 1.0
        if average(lo) <= float(target):
            hi = lo
        else:
            for _ in range(50):
                mid = (lo + hi) / 2
                if average(mid) <= float(target):
                    hi = mid
                else:
                    lo = mid
        keep = shares(hi)
        return cls(num_layers=num_layers, keep=tuple(max(v, 1e-6) for v in keep), target=float(target),
                   samples=len(rows))

    # ---- files --------------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": RECIPE_FORMAT, "num_layers": self.num_layers, "keep": list(self.keep),
                           "target": self.target, "samples": self.samples}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "FitPruneRecipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a FitPrune recipe (invalid JSON: {e})") from None
        if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT:
            raise ValueError(f"not a FitPrune recipe: expected format {RECIPE_FORMAT!r}")
        missing = [key for key in ("num_layers", "keep", "target") if key not in data]
        if missing:
            raise ValueError(f"FitPrune recipe lacks {missing}")
        if not isinstance(data["keep"], list):
            raise ValueError("FitPrune recipe: keep must be a list of shares")
        return cls(num_layers=data["num_layers"], keep=tuple(data["keep"]), target=float(data["target"]),
                   samples=int(data.get("samples", 0)))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FitPruneRecipe":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())


@dataclass
class _AttentionRecorder(LLMCompressor):
    """Calibration: a stage before every decoder layer that records the text tokens' attention to each item's
    tokens in the layer before and changes nothing (it returns no compression), so the model runs unchanged."""

    records: list = field(default_factory=list)

    info: ClassVar[MethodInfo] = MethodInfo(
        name="fitprune_calibration", family="attention", modalities=("image", "video"), stage="llm",
        query_aware=True, reference="FitPrune arXiv:2409.10197 (calibration)")
    requires: ClassVar[tuple[str, ...]] = ("last_attention", "text_attention")

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        return [(layer, n - 1) for layer in range(1, num_layers)] if n >= 2 else []

    def stage(self, tokens, k, *, final, last, signals, context):  # type: ignore[override]
        rows = context.memo.get("rows")
        if rows is None:
            rows = context.memo["rows"] = []
            self.records.append(rows)
        rows.append(text_relevance(signals)[0].detach().float().cpu())
        return None


def text_relevance(signals: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, N]``: the mean attention the text tokens after the item pay each token (the last token's when no text
    follows the item)."""
    att = signals.get("text_attention")
    if att is not None and att.shape[1] > 0:
        return att.float().mean(dim=1)
    return signals["last_attention"].float()


@dataclass
class FitPrune(LLMScorer):
    """FitPrune ("Fit and Prune: Fast and Training-free Visual Token Pruning for Multi-modal Large Language Models",
    Ye et al., arXiv:2409.10197): a pruning recipe (how many visual tokens enter each decoder layer) fitted to
    attention statistics from a few calibration inputs, then applied inside the LLM.

    Calibration (the recipe's API)::

        stats = tz.FitPrune.calibrate(model, [inputs1, inputs2, ...])  # runs the model unchanged
        recipe = tz.FitPruneRecipe.fit(stats, target=0.3)             # average share of visual tokens per layer
        recipe.save("fitprune.json")                                   # later: tz.FitPruneRecipe.load(...)
        with tz.FitPrune(retain=recipe.keep[-1], recipe=recipe)(model): ...

    ``calibrate`` records, for each item and decoder layer, the attention the text tokens after the item pay its
    tokens (mean over heads and text rows). ``FitPruneRecipe.fit`` bisects a threshold ``alpha`` (the attention
    mass a layer may lose): a layer keeps the fewest tokens holding ``1 - alpha`` of its attention, averaged over
    the items as a share; a token pruned stays pruned (running minimum over layers); the smallest ``alpha`` whose
    average share over the layers is within ``target`` gives the recipe.

    Inference: before each layer where the recipe's share drops, each item keeps its tokens most attended by the
    text after it in the layer before (``text_attention`` mean over rows; ``last_attention`` when no text follows).
    Budget: ``retain``/``tokens`` is the final count ``k`` (every layer from the recipe's last drop on sees exactly
    ``k``); the recipe gives the shape: the count entering layer ``l`` is ``k + round((N - k) * (keep[l] -
    keep[-1]) / (1 - keep[-1]))``, i.e. exactly the recipe's ``round(keep[l] * N)`` when ``retain=keep[-1]``. A
    recipe fitted for a different depth is a ValueError when the method is put on the model. Without a recipe, the
    prior is the recipe fitted to uniform attention (every layer needs the same share): one stage, before layer 1.

    Departures: the paper's statistics also include the visual tokens' self-attention and its budget is FLOPs;
    here the statistic is the text-to-visual attention the LLM stage produces, and the budget is the average share
    of visual tokens over the layers (FLOPs up to the text part). The recipe is per share of an item's tokens (the
    paper counts tokens for LLaVA's fixed 576). Per-item budget; kept tokens keep their original positions; ties
    go to the earlier token.
    """

    recipe: FitPruneRecipe | None = None

    info: ClassVar[MethodInfo] = MethodInfo(
        name="fitprune", family="attention", modalities=("image", "video"), stage="llm", query_aware=True,
        reference="Ye et al., Fit and Prune (FitPrune), arXiv:2409.10197")
    requires: ClassVar[tuple[str, ...]] = ("last_attention", "text_attention")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recipe is not None and not isinstance(self.recipe, FitPruneRecipe):
            raise TypeError(f"recipe must be a FitPruneRecipe (FitPruneRecipe.fit / load), got "
                            f"{type(self.recipe).__name__}")

    @staticmethod
    def calibrate(model: torch.nn.Module, calls: Iterable[dict[str, Any]]) -> list[torch.Tensor]:
        """Run ``model`` (unchanged) on each call's keyword arguments and return, per media item, the tensor
        ``[L - 1, n]`` of the attention the text after it pays its ``n`` tokens in decoder layers ``0 .. L - 2``."""
        out: list[torch.Tensor] = []
        for i, call in enumerate(calls):
            if not isinstance(call, dict):
                raise TypeError(f"calls[{i}] must be a dict of the model's keyword arguments, got "
                                f"{type(call).__name__}")
            recorder = _AttentionRecorder(retain=1.0)
            with torch.no_grad(), recorder(model):
                model(**call)
            out.extend(torch.stack(rows) for rows in recorder.records if rows)
        if not out:
            raise ValueError("calibration found no media items (of at least 2 tokens) in the calls")
        return out

    def _recipe(self, num_layers: int) -> FitPruneRecipe:
        if self.recipe is None:
            return FitPruneRecipe(num_layers=num_layers, keep=(1.0,) + (1e-6,) * (num_layers - 1), target=0.0)
        if self.recipe.num_layers != num_layers:
            raise ValueError(f"this FitPrune recipe was fitted on a {self.recipe.num_layers}-layer LLM; the model "
                             f"has {num_layers} decoder layers: calibrate and fit a recipe on it")
        return self.recipe

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        keep = self._recipe(num_layers).keep
        k = self.budget.count(n)
        if k >= n:
            return []
        low = keep[-1]
        out, prev = [], n
        for layer in range(1, num_layers):
            share = 0.0 if low >= 1.0 else (keep[layer] - low) / (1.0 - low)
            count = min(prev, max(k, k + math.floor((n - k) * share + 0.5)))
            if count < prev:
                out.append((layer, count))
                prev = count
        return out  # the last layer's share is keep[-1]: the count is k there at the latest

    def decode_layer(self, num_layers: int) -> int | None:
        self._recipe(num_layers)  # called with the depth when the method is put on a model: refuse a misfit there
        return None

    def score_tokens(self, tokens: torch.Tensor, layout: ops.Layout, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        return text_relevance(signals)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        return ops.select(tokens, ops.stable_topk(text_relevance(signals), k))
