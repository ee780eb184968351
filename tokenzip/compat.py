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


def attention_seq_length(cache: Any, layer: int) -> int:
    """Tokens cached by full-attention layer ``layer`` (a plain ``int``).

    Hybrid caches (Qwen3.5: linear-attention layers interleaved with full-attention ones) answer
    ``Cache.get_seq_length()`` differently across the supported range: transformers 5.18-5.24 jump from a
    linear-attention layer 0 to the first full-attention layer (and raise for another linear index), 5.25 returns
    layer 0's own count, as a 0-d tensor. Asking for an explicit full-attention layer gives the same answer in all."""
    return int(cache.get_seq_length(layer))
