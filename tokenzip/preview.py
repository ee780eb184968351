"""What a method would keep on one model call, without generating: the library call behind ``tokenzip show`` and
the demo's overlays.

    stats = tokenzip.preview.kept_items(tz.get("visionzip", retain=0.1), model, inputs)
    tokenzip.viz.overlay(image, stats[0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .adapters import Adapter
from .base import Compressor
from .compose import Composed
from .output import ItemStats
from .patch import Patch


class _EncodedOnce:
    """The model's adapter with one call's media already encoded: several methods' ``Patch.prepare`` share the
    encoder pass (each still picks only the signals it asks for)."""

    def __init__(self, adapter: Adapter, items: list[Any]):
        self._adapter = adapter
        self._items = items

    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Any]:
        return self._items

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)


def kept_items(compressor: Compressor | Composed | Sequence[Compressor | Composed], model: torch.nn.Module,
               inputs: dict[str, Any]) -> list[ItemStats] | list[list[ItemStats]]:
    """The :class:`tokenzip.ItemStats` of every media item in ``inputs`` (per sample, grouped by modality), computed
    by the very code ``model.generate`` runs under ``compressor(model)``: the model's adapter encodes the media and
    hands the method its signals, :class:`tokenzip.patch.Patch` applies it. Pre-LLM and encoder-stage methods run
    only that (no LLM); LLM-stage methods (and pipelines with an LLM stage) need one prefill forward under the patch.

    ``compressor`` may be a list of methods: then the pre-LLM ones share one encoder pass (the union of the signals
    they ask for) and the result is one list of ItemStats per method, in order.

    TypeError for a model tokenzip does not support or a method of another stage / modality; ValueError when
    ``inputs`` carry no media."""
    many = isinstance(compressor, (list, tuple))
    compressors = list(compressor) if many else [compressor]
    if not compressors:
        raise ValueError("compressor: give at least one method")
    for c in compressors:
        if not isinstance(c, (Compressor, Composed)):
            raise TypeError(f"compressor must be a tokenzip method (tz.get(...)), got {type(c).__name__}")
    if not isinstance(inputs, dict):
        raise TypeError(f"inputs must be the processor's dict of tensors, got {type(inputs).__name__}")
    # TypeError for unsupported models / methods of another stage or modality, before anything runs
    patches = [Patch(c, model) for c in compressors]
    if not patches[0].adapter.has_media(inputs):
        raise ValueError("inputs: the model call carries no media to compress")
    # methods before the LLM that leave the encoder alone see the same encoder output: encode once for all of them
    shared = [p for p in patches if p.llm_compressor is None and p.input is None and p.pre.info.stage == "pre_llm"]
    try:
        with torch.no_grad():
            if shared:
                adapter = shared[0].adapter
                needs = frozenset().union(*(p.pre.signals_needed() for p in shared))
                encoded = _EncodedOnce(adapter, adapter.encode(dict(inputs), needs))
                for p in shared:
                    p.adapter = encoded
                    p.prepare(dict(inputs))
            for p in patches:
                if p in shared:
                    continue
                if p.llm_compressor is not None:
                    with p:
                        model(**inputs)
                else:  # an encoder- or input-stage method: the encoder pass itself differs
                    p.prepare(dict(inputs))
    finally:
        for p in patches:
            p.adapter.release()
    results = [[item for per_sample in c.last_stats for stats in per_sample.values() for item in stats.items]
               for c in compressors]
    return results if many else results[0]


__all__ = ["kept_items"]
