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
import sys
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


def omni_thinker_parts(thinker: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(core, language_model)`` of a Qwen2.5-Omni / Qwen3-Omni thinker.

    ``core`` is the module that holds the towers (``visual``, ``audio_tower``), the feature getters, the M-RoPE helpers
    (``get_rope_index``, ``get_chunked_index``) and the ``rope_deltas`` that decoding reuses.

    - transformers >= 5.21: ``thinker.model`` is a ``…ThinkerModel`` holding all of that, with the text model as its
      ``language_model``.
    - transformers 5.18 - 5.20: no ``…ThinkerModel``; the thinker itself holds the towers, the helpers and
      ``rope_deltas``, and ``thinker.model`` is the text model.
    """
    inner = thinker.model
    if hasattr(inner, "language_model"):
        return inner, inner.language_model
    return thinker, inner


def layer_function(module: torch.nn.Module, name: str) -> Any:
    """The function ``name`` (e.g. ``apply_rotary_pos_emb``) as ``module``'s own forward calls it, or None.

    With the ``kernels`` package installed (a required dependency from transformers 5.25; optional before), an
    attention class decorated ``@use_kernelized_func(fn)`` gives each instance private wrappers of its module-level
    functions (in ``module._kernel_funcs``, keyed by the function's ``__name__`` or, for the wrapped functions
    transformers declares with ``@use_kernel_forward_from_hub("rotary_pos_emb")``, by that layer name), and inside
    the forward the module-level name dispatches to them.
    ``kernels.kernelize`` (which ``from_pretrained`` runs by default on CUDA from 5.25) swaps those wrappers' forward
    for a hub kernel (e.g. the rotary kernel), while the module-level function called from outside the forward stays
    the Python reference. Recomputing attention from a layer's q/k must use the wrapper. Without ``kernels`` there
    are no wrappers (None): the module-level function is what the forward calls.
    """
    funcs = getattr(module, "__dict__", {}).get("_kernel_funcs")
    if not isinstance(funcs, dict):
        return None
    fn = getattr(sys.modules.get(type(module).__module__), name, None)
    key = getattr(fn, "__name__", None) or getattr(fn, "kernel_layer_name", None)
    return funcs.get(key) if key is not None else None


def clip_rows(pooler_output: Any) -> torch.Tensor:
    """``get_video_features(...).pooler_output`` as one ``[clips, N, D]`` tensor. LLaVA-NeXT-Video's is a tuple of
    per-clip ``[T, g*g, D]`` tensors in transformers 5.18 (``torch.split`` by frames) and one ``[clips, T*g*g, D]``
    tensor in 5.24/5.25 (the releases in between not checked); LLaVA-OneVision returns the tensor in both."""
    if isinstance(pooler_output, (tuple, list)):
        return torch.stack([f.reshape(-1, f.shape[-1]) for f in pooler_output])
    return pooler_output


# ---- SmolVLM / Idefics3 image features ------------------------------------------------------------------------------
# transformers 5.18: ``get_image_features(...).pooler_output`` is one tensor ``[tiles, T, D]`` (every real tile of
# the batch), and the model's ``inputs_merger`` reads precomputed features as ``[blocks, k, D]``: blocks of ONE size,
# scattered k placeholders at a time. By 5.25 ``pooler_output`` is a per-sample list of ``[tiles_i * T, D]`` and the
# model concatenates whatever it gets (a list or a tensor) and scatters it in placeholder order (masked_scatter).


def tile_features(pooler_output: Any, tokens_per_tile: int) -> torch.Tensor:
    """``[tiles, T, D]``: every real tile's features, in placeholder order, from either form of ``pooler_output``."""
    if isinstance(pooler_output, (list, tuple)):
        pooler_output = torch.cat([t.reshape(-1, t.shape[-1]) for t in pooler_output])
    return pooler_output.reshape(-1, tokens_per_tile, pooler_output.shape[-1])


def tile_features_input(model: torch.nn.Module, feats: list[torch.Tensor]) -> torch.Tensor:
    """The precomputed features of the kept tokens, one ``[k_j, D]`` per tile, as the installed model reads them:
    ``[tiles, k, D]`` when every tile keeps the same count (both forms), else ``[1, sum k_j, D]`` (5.25's
    masked_scatter; 5.18's block merger cannot take tiles of different counts: a ValueError)."""
    if len({int(f.shape[0]) for f in feats}) == 1:
        return torch.stack(feats)
    merger = getattr(type(getattr(model, "model", model)), "inputs_merger", None)
    if merger is not None and "patch_size" in inspect.getsource(merger):  # 5.18 SmolVLM: fixed-size blocks
        raise ValueError(f"{type(model).__name__} in this transformers version reads precomputed features in blocks "
                         f"of one size; every tile must keep the same number of tokens, got "
                         f"{sorted({int(f.shape[0]) for f in feats})}")
    return torch.cat(feats)[None]


def attention_seq_length(cache: Any, layer: int) -> int:
    """Tokens cached by full-attention layer ``layer`` (a plain ``int``).

    Hybrid caches (Qwen3.5: linear-attention layers interleaved with full-attention ones) answer
    ``Cache.get_seq_length()`` differently across the supported range: transformers 5.18-5.24 jump from a
    linear-attention layer 0 to the first full-attention layer (and raise for another linear index), 5.25 returns
    layer 0's own count, as a 0-d tensor. Asking for an explicit full-attention layer gives the same answer in all."""
    return int(cache.get_seq_length(layer))
