"""What an adapter adds to support stage ``"llm"``: a mixin with generic accessors for the decoder, and a helper
that turns runs of placeholder tokens into :class:`LLMItem` s. An adapter mixes ``LLMAccess`` in, adds ``"llm"`` to
``stages`` and implements ``llm_items`` (usually one call to :func:`placeholder_items`)."""

from __future__ import annotations

from typing import Any

import torch

from .hooks import LLMItem


class LLMAccess:
    model: torch.nn.Module

    def llm_model(self) -> torch.nn.Module:
        """The decoder stack (``LlamaModel`` / ``Qwen2Model`` / ``Qwen2VLTextModel`` ...): receives
        ``inputs_embeds``, the 2-D ``attention_mask`` and the cache (see :mod:`tokenzip.compat`)."""
        return self.parts().language_model

    def llm_layers(self) -> torch.nn.ModuleList:
        return self.parts().decoder_layers

    def llm_norm(self) -> torch.nn.Module:
        return self.parts().final_norm

    def llm_attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "q_proj") or not hasattr(attn, "k_proj"):
            raise TypeError(f"cannot find a q_proj/k_proj self-attention in {type(layer).__name__}")
        return attn

    def llm_layer_kinds(self) -> list[str]:
        """Each decoder layer's kind, ``"full_attention"``, ``"sliding_attention"`` (Gemma 3's local layers) or
        ``"linear_attention"`` (a recurrent token mixer with no attention matrix, e.g. Qwen3.5's Gated DeltaNet): the
        text config's ``layer_types`` when it has them."""
        kinds = getattr(self.llm_model().config, "layer_types", None)
        return list(kinds) if kinds else ["full_attention"] * len(self.llm_layers())

    def llm_mixer(self, index: int) -> torch.nn.Module:
        """The token mixer of decoder layer ``index``: its self-attention, or on a hybrid LLM's linear-attention
        layer the recurrent mixer (adapters of hybrid LLMs say where it lives); it receives the layer's mask."""
        layer = self.llm_layers()[index]
        if self.llm_layer_kinds()[index] != "linear_attention":
            return self.llm_attention(layer)
        raise TypeError(f"{type(self).__name__} does not say where layer {index}'s linear-attention mixer lives")

    def llm_attn_implementation(self) -> str:
        return str(self.llm_model().config._attn_implementation)

    def llm_padding_mask(self, lm_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The ``[B, L]`` padding mask of a call of the decoder stack (``lm_kwargs``: its keyword arguments), or
        None (no padding). Default: its 2-D ``attention_mask``. A model that hands its decoder prepared masks
        (Gemma 3: a dict per layer type) overrides this with the 2-D mask of the call that prepared them."""
        mask = lm_kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError("LLM-stage compression needs a 2-D attention_mask (or none); got a prepared mask")
        return mask

    def llm_blocks(self, length: int) -> torch.Tensor | None:
        """``[B, length]``: the bidirectional attention block of each position of the prefill now starting (``-1``:
        causal token), or None when the model has none. Gemma 3's image blocks attend to themselves in both
        directions; the LLM stage keeps that overlay over the kept tokens of each block."""
        return None

    def llm_items(self, kwargs: dict[str, Any]) -> list[LLMItem]:
        """The visual items of this call's sequence (in sequence order), or [] when the call has no media."""
        raise NotImplementedError


def placeholder_items(input_ids: torch.Tensor, token_id: int, sizes: list[int], owners: list[int],
                      modality: str = "image", grids: list[Any] | None = None) -> list[LLMItem]:
    """Item ``j`` (of sample ``owners[j]``) is the next ``sizes[j]`` placeholders ``token_id`` of its sample."""
    items: list[LLMItem] = []
    cursor = [0] * input_ids.shape[0]
    where = [(input_ids[b] == token_id).nonzero().flatten() for b in range(input_ids.shape[0])]
    for j, (n, b) in enumerate(zip(sizes, owners)):
        pos = where[b][cursor[b]: cursor[b] + n]
        if pos.numel() != n:
            raise ValueError(f"{modality} {j} needs {n} placeholder tokens in sample {b}, found {pos.numel()}")
        cursor[b] += n
        items.append(LLMItem(modality, b, pos, None if grids is None else grids[j]))
    return items
