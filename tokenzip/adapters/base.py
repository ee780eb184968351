"""What every model adapter provides. Adapters know nothing of methods: they find each item's tokens, compute the
signals a method asks for, and hand compressed tokens back to the model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..ops import Layout
from ..output import CompressOutput


@dataclass(frozen=True)
class ModelParts:
    """Where the parts of one model live. The adapter is the one source of model structure: the LLM stage, the
    bench, the CLI and the presets ask ``adapter.parts()`` instead of guessing attribute paths.

    encoder:        the media encoder whose forward is "encoder time" (vision tower, audio encoder)
    encoder_layers: its transformer blocks, in order
    projector:      the module that maps encoder features into the LLM's space (None: none, or inside ``encoder``)
    language_model: the decoder stack that reads the media tokens (has ``decoder_layers`` and ``final_norm``)
    decoder_layers: its blocks, in order
    final_norm:     its last norm (the LLM stage writes the full-length sequence back before it)
    embed:          the input embedding of the token ids
    media_token_ids: modality -> placeholder token id in ``input_ids`` (empty for encoder-decoders like Whisper)
    """

    encoder: torch.nn.Module
    encoder_layers: torch.nn.ModuleList
    projector: torch.nn.Module | None
    language_model: torch.nn.Module
    decoder_layers: torch.nn.ModuleList
    final_norm: torch.nn.Module
    embed: torch.nn.Module
    media_token_ids: dict[str, int] = field(default_factory=dict)


@dataclass
class Item:
    """One image / video / audio clip of one sample, as the method sees it."""

    modality: str
    sample: int  # batch row the item belongs to
    tokens: torch.Tensor  # [N, D] in the space the method compresses
    grid: Layout  # row-major grids tiling the N tokens
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # adapter-private bookkeeping

    @property
    def tokens_in(self) -> int:
        return self.extra.get("tokens_in", self.tokens.shape[0])


class Adapter(ABC):
    """Base adapter. ``model_classes`` are class names, so unsupported models get a clear TypeError."""

    model_classes: ClassVar[tuple[str, ...]] = ()
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    stages: ClassVar[tuple[str, ...]] = ("pre_llm",)

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @abstractmethod
    def parts(self) -> ModelParts:
        """Where this model keeps its encoder, projector, language model, layers, norm and embedding."""

    @abstractmethod
    def has_media(self, kwargs: dict[str, Any]) -> bool:
        """Whether this call carries media to compress (e.g. ``pixel_values`` at prefill)."""

    @abstractmethod
    def batch_size(self, kwargs: dict[str, Any]) -> int:
        ...

    @abstractmethod
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        """Run the encoder and return the items in sequence order, with the requested signals."""

    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        """Stage "encoder": compress between encoder layers ``layer - 1`` and ``layer``, or after each layer count of
        a tuple using ``step`` (``tokenzip.encoder.CompressStep``) at the earlier cuts (adapters that list the stage
        implement this)."""
        raise TypeError(f"{type(self).__name__} has no encoder stage")

    def release(self) -> None:
        """Called after every patched forward()/generate() call, also after an exception: drop per-call state."""

    @abstractmethod
    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        """Arguments for the original forward()/generate() that feed the compressed tokens to the LLM."""


def text_signals(embed: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 media_token_ids: set[int], sample: int) -> dict[str, torch.Tensor]:
    """The prompt's text-token embeddings for one sample (media placeholders and padding excluded)."""
    ids = input_ids[sample]
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask[sample].bool()
    for t in media_token_ids:
        mask &= ids != t
    return {"text": embed(ids[mask]).detach(), "text_mask": torch.ones(int(mask.sum()), dtype=torch.bool,
                                                                      device=ids.device)}


def padding_side(attention_mask: torch.Tensor | None) -> str:
    if attention_mask is None:
        return "left"
    if bool((attention_mask[:, -1] == 0).any()) and not bool((attention_mask[:, 0] == 0).any()):
        return "right"
    return "left"


def shrink_sequences(kwargs: dict[str, Any], keep: torch.Tensor, pad_token_id: int,
                     seq_keys: tuple[str, ...] = ("labels", "token_type_ids", "mm_token_type_ids")) -> dict[str, Any]:
    """Drop the positions where ``keep`` ``[B, L]`` is False from ``input_ids``, ``attention_mask`` and the other
    per-position tensors, re-padding on the side the batch was padded on. 2-D ``position_ids`` are renumbered from
    the new mask (positions are contiguous again after pre-LLM compression)."""
    input_ids = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    side = padding_side(mask)
    b = input_ids.shape[0]
    if mask is None:
        mask = torch.ones_like(input_ids)
    keep = keep & mask.bool()
    lengths = keep.sum(dim=1)
    width = int(lengths.max())
    out = dict(kwargs)

    def pack(t: torch.Tensor, fill: Any) -> torch.Tensor:
        new = torch.full((b, width), fill, dtype=t.dtype, device=t.device)
        for i in range(b):
            row = t[i][keep[i]]
            if side == "left":
                new[i, width - row.shape[0]:] = row
            else:
                new[i, : row.shape[0]] = row
        return new

    out["input_ids"] = pack(input_ids, pad_token_id)
    new_mask = pack(torch.ones_like(mask), 0)
    out["attention_mask"] = new_mask.to(mask.dtype)
    for key in seq_keys:
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.shape[:2] == input_ids.shape:
            out[key] = pack(t, -100 if key == "labels" else 0)
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() == 2:
        out["position_ids"] = (new_mask.long().cumsum(-1) - 1).clamp(min=0).to(pos.dtype)
    if "cache_position" in kwargs and kwargs["cache_position"] is not None:
        out["cache_position"] = torch.arange(width, device=input_ids.device)
    return out


def pad_id_for(config: Any, avoid: set[int]) -> int:
    for cfg in (config, getattr(config, "text_config", None)):
        pid = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if isinstance(pid, int) and pid >= 0 and pid not in avoid:
            return pid
    return next(i for i in range(len(avoid) + 1) if i not in avoid)
