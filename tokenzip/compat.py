"""What differs between the transformers releases tokenzip supports (the range in ``pyproject.toml``).

Everything that reads or passes a model's KV cache goes through here, so the next rename is one edit.

transformers 5.24 renamed the cache argument and output field ``past_key_values`` (and ``cache_params`` of the
state-space models) to ``cache``, everywhere: ``forward(cache=...)`` of every model and decoder layer,
``generate(cache=...)``, and ``ModelOutput.cache``. The old names still work from the caller's side (a decorator
renames the keyword, with a FutureWarning, and outputs keep a ``past_key_values`` property), but *inside* the model
the cache now travels under ``cache`` only: a forward pre-hook that reads ``kwargs["past_key_values"]`` finds
nothing in 5.24, so the LLM stage believed it was in a prefill without cache, skipped the per-layer decode masks,
and SDPA failed with a mask built for the uncompressed length. Through 5.23 the name is ``past_key_values``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# newest name first: a call carries at most one of them
CACHE_KWARGS = ("cache", "past_key_values")


def cache_from(kwargs: dict[str, Any]) -> Any:
    """The cache passed in a forward()/generate()/hook's keyword arguments, under either name (or None)."""
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes the cache in the installed transformers."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_KWARGS if name in params), CACHE_KWARGS[-1])


def output_cache(output: Any) -> Any:
    """The cache a model or ``generate()`` output returned (``.cache`` from 5.24, ``.past_key_values`` before),
    without tripping the deprecation warning of the old name."""
    keys = output.keys() if hasattr(output, "keys") else ()
    for name in CACHE_KWARGS:
        if name in keys:
            return output[name]
    return None


def clip_rows(pooler_output: Any) -> torch.Tensor:
    """``get_video_features(...).pooler_output`` as one ``[clips, N, D]`` tensor. LLaVA-NeXT-Video's is a tuple of
    per-clip ``[T, g*g, D]`` tensors in transformers 5.18 (``torch.split`` by frames) and one ``[clips, T*g*g, D]``
    tensor in 5.24/5.25 (the releases in between not checked); LLaVA-OneVision returns the tensor in both."""
    if isinstance(pooler_output, (tuple, list)):
        return torch.stack([f.reshape(-1, f.shape[-1]) for f in pooler_output])
    return pooler_output
