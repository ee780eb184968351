"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower (no CLS) on fixed-size images (or pan-and-scan crops,
each its own image), its last hidden state average-pooled to ``mm_tokens_per_image`` tokens (a square grid), RMS norm
and a linear projection into the LLM. Each image is ``<start_of_image>`` + ``<image_soft_token>`` x 256 +
``<end_of_image>`` in the prompt.

What is particular to it, and what the adapter does about it:

- **Markers stay.** Only each image's run of soft tokens shrinks; ``<start_of_image>`` / ``<end_of_image>`` and the
  newlines around them are text and stay.
- **Bidirectional image blocks.** ``token_type_ids`` (1 at the soft tokens) make each image's soft tokens attend to
  each other in both directions, on the full-attention and the sliding-window layers alike. Before the LLM,
  ``token_type_ids`` (and ``mm_token_type_ids`` when a call carries it) shrink with the prompt, so the model builds
  the overlay over the kept tokens itself. Inside the LLM (stage ``"llm"``), the runner rebuilds the overlay over
  each block's kept tokens on both kinds of masks (:meth:`llm_blocks`; ``tokenzip.llm.slots.block_overlay``).
- **Sliding/global layers and two rotary tables.** Each decoder layer gets its own layer type's cos/sin; the LLM
  stage gathers whichever it receives at the kept slots (kept tokens keep their positions) and measures a sliding
  layer's window in original positions, as the uncompressed model does.
- **Prepared masks.** Gemma 3 hands its decoder a dict of 4-D masks, so the LLM stage takes the call's 2-D padding
  mask from the multimodal model's own call (a pre-hook installed with the patch, removed with it).

Compression acts on the projected tokens (the LLM's input space: the pooled grid exists only after the projector's
average pool); ``cls_attention`` (attention received, no CLS) and ``keys`` come from the tower's last layer, averaged
over each pooling window. The shortened prompt and the compressed features reach the stock model through
``mm_encoder_outputs``.

Stage ``"encoder"`` (``tz.InEncoder(method, layer=L)`` or a schedule; :mod:`tokenzip.adapters.grouped_tower`,
shared with SmolVLM): the unit is one pooling window (``kernel x kernel`` patches = one LLM token, so a budget means
the same as before the LLM); the candidates are the windows' patch states concatenated, the later SigLIP layers run
on the kept windows' patches with proportional attention, and the post-norm and the model's own projector turn each
kept window into its token. ``projected`` is not offered inside the tower.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import layout as L
from ..callstate import per_call
from ..encoder import EncoderSpec
from ..llm.adapter import LLMAccess
from ..llm.hooks import LLMItem
from ..output import CompressOutput
from .base import Adapter, Item, ModelParts
from .grouped_tower import GroupedTower, TowerImage, block_groups
from .placeholders import (
    check_runs,
    pad_id_for,
    placeholder_keep_mask,
    placeholder_runs,
    require_input_ids,
    shrink_sequences,
    square_image_items,
    text_signals,
)
from .probe import probe
from .vision import attention_module, encoder_layers, pool_patch_signals

HINT = "build the inputs with Gemma3Processor (one <start_of_image> + soft tokens + <end_of_image> per image)"


class Gemma3Adapter(LLMAccess, Adapter):
    model_classes = ("Gemma3ForConditionalGeneration",)
    modalities = ("image",)
    # per-call state, per thread (tokenzip/callstate.py): each image's groups inside SigLIP (stage "encoder")
    _tower_images = per_call()
    stages = ("pre_llm", "encoder", "llm")
    signals = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})
    # inside the tower the projector has not run: no ``projected``
    encoder_signals = frozenset({"cls_attention", "keys", "text", "text_mask"})
    input_stage_note = ("Gemma 3's SigLIP tower takes a fixed input size and always gives mm_tokens_per_image "
                        "tokens per image; use a pre-LLM or LLM-stage method")

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.core = model.model
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.tokens_per_image = int(cfg.mm_tokens_per_image)
        self.side = math.isqrt(self.tokens_per_image)
        patches = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
        self.kernel = patches // self.side
        self._hook: Any = None
        self._call: dict[str, Any] = {}  # the multimodal model's 2-D attention_mask / token_type_ids, this call
        self.tower: GroupedTower | None = None  # stage "encoder" (set_encoder_layer)
        self.step: Any = None  # a schedule's compression at the cuts before the last
        self._tower_images: list[TowerImage] | None = None

    def parts(self) -> ModelParts:
        core = self.core
        lm = core.language_model
        return ModelParts(encoder=core.vision_tower, encoder_layers=encoder_layers(core.vision_tower),
                          projector=core.multi_modal_projector, language_model=lm, decoder_layers=lm.layers,
                          final_norm=lm.norm, embed=core.get_input_embeddings(),
                          media_token_ids={"image": self.image_token_id})

    def has_media(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None

    def batch_size(self, kwargs: dict[str, Any]) -> int:
        return require_input_ids(kwargs).shape[0]

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def install(self) -> None:
        def note(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            mask = kwargs.get("attention_mask")
            self._call = {"attention_mask": mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
                          "token_type_ids": kwargs.get("token_type_ids")}
        self._hook = self.core.register_forward_pre_hook(note, with_kwargs=True)

    def release(self) -> None:
        self._call = {}
        self._tower_images = None

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._call = {}

    # ---- stage "pre_llm" ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        input_ids = require_input_ids(kwargs)
        pixel_values = kwargs["pixel_values"]
        if self.tower is not None:
            return self._encode_in_tower(kwargs, needs, input_ids, pixel_values)
        tower = self.core.vision_tower
        with probe(attention_module(encoder_layers(tower)[-1]), needs, None) as p:
            feats = self.core.get_image_features(pixel_values, return_dict=True).pooler_output  # [n, T, D]
        owners = check_runs(placeholder_runs(input_ids, self.image_token_id), [self.tokens_per_image] * feats.shape[0],
                            "image", HINT)
        pooled = pool_patch_signals(p.results, self.side, self.kernel)
        return square_image_items(self.core.get_input_embeddings(), kwargs, self.image_token_id, feats, owners, pooled,
                                  self.side, needs)

    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        input_ids = kwargs["input_ids"]
        counts: list[list[tuple[int, int]]] = [[] for _ in range(input_ids.shape[0])]
        for item, out in zip(items, outputs):
            counts[item.sample].append((item.tokens_in, out.tokens.shape[1]))
        keep = placeholder_keep_mask(input_ids, self.image_token_id, counts)
        # token_type_ids / mm_token_type_ids shrink with the prompt: the model rebuilds each block's overlay
        new = shrink_sequences(kwargs, keep, pad_id_for(self.model.config, {self.image_token_id}))
        new.pop("pixel_values", None)
        if self.tower is None:
            feats = [out.tokens[0] for out in outputs]
        else:  # the tower's later layers on the kept groups, its post-norm and the model's projector
            feats = self.tower.finish(self._tower_images, outputs, self._width())
        # the model reads one tensor (it calls .to() on it) and scatters it in placeholder order
        if len({f.shape[0] for f in feats}) == 1:
            pooler = torch.stack(feats)
        else:
            pooler = torch.cat(feats)[None]
        new["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooler)}
        return new

    # ---- stage "encoder" (adapters/grouped_tower.py: whole 4x4 pooling windows inside SigLIP) ----------------------
    def _siglip(self) -> torch.nn.Module:
        tower = self.core.vision_tower
        return getattr(tower, "vision_model", tower)

    def _width(self) -> int:
        return int(self.model.config.vision_config.hidden_size)

    def encoder_depth(self) -> int:
        """SigLIP's layers: the LLM reads the last one's output (after the post-norm)."""
        return len(encoder_layers(self.core.vision_tower))

    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        vm = self._siglip()
        dtype = self.core.vision_tower.dtype

        def embed(pixel_values: torch.Tensor) -> torch.Tensor:
            return vm.embeddings(pixel_values.to(dtype))

        spec = EncoderSpec(embed=embed, layers=encoder_layers(self.core.vision_tower),
                           final_norm=getattr(vm, "post_layernorm", None), attention=attention_module)
        tower = GroupedTower(spec, layer, block_groups(self.side * self.kernel, self.kernel),
                             self.core.multi_modal_projector, self.side)  # ValueError naming the valid cuts
        if len(tower.cuts) > 1 and step is None:
            raise ValueError("a schedule of encoder cuts needs a compression step for the intermediate cuts")
        self.tower, self.step = tower, step

    def _encode_in_tower(self, kwargs: dict[str, Any], needs: frozenset[str], input_ids: torch.Tensor,
                         pixel_values: torch.Tensor) -> list[Item]:
        """SigLIP up to the (last) cut; one item per image whose tokens are its 4x4 pooling windows' patches."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [images, 3, H, W] as Gemma3Processor makes them, got shape "
                             f"{tuple(pixel_values.shape)}")
        owners = check_runs(placeholder_runs(input_ids, self.image_token_id),
                            [self.tokens_per_image] * pixel_values.shape[0], "image", HINT)
        texts = {b: text_signals(self.core.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                                 {self.image_token_id}, b) if {"text", "text_mask"} & needs else {}
                 for b in set(owners)}
        take = self.step is not None and "image" in (getattr(self.step, "modalities", None) or ("image",))
        images, layouts, counts = self.tower.encode(self.tower.runner.embed(pixel_values), None, needs,
                                                    self.step if take else None, lambda i: texts[owners[i]])
        self._tower_images = images
        extra: dict[str, Any] = {"tokens_in": self.tokens_per_image}
        if counts:  # a schedule: the last cut reaches each image's budget
            extra["k"] = counts[-1]
        return [Item("image", b, im.state.hidden[0], layout, {**im.signals, **texts[b]}, extra=dict(extra))
                for im, layout, b in zip(images, layouts, owners)]

    # ---- stage "llm" --------------------------------------------------------------------------------------------
    def llm_items(self, kwargs: dict[str, Any]) -> list[LLMItem]:
        """Each image's run of soft tokens (between its start/end markers) in the LLM sequence; an uncompressed run
        gets the pooled square grid, one a pre-LLM method shortened (``tz.compose``) no grid."""
        pre = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if kwargs.get("pixel_values") is None and pre is None:
            return []
        runs = placeholder_runs(require_input_ids(kwargs), self.image_token_id)
        grid = L.grid(self.side, self.side)
        return [LLMItem("image", b, pos, grid if pos.numel() == self.tokens_per_image else None)
                for b, sample in enumerate(runs) for pos in sample]

    def llm_padding_mask(self, lm_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """Gemma 3's decoder gets a dict of prepared masks: the 2-D mask is the multimodal model's call's."""
        mask = lm_kwargs.get("attention_mask")
        if isinstance(mask, dict):
            return self._call.get("attention_mask")
        return super().llm_padding_mask(lm_kwargs)

    def llm_blocks(self, length: int) -> torch.Tensor | None:
        """Each image's soft tokens form one bidirectional block (consecutive ``token_type_ids == 1``, as the
        model's ``get_block_sequence_ids_for_mask``); None without ``token_type_ids`` (the model then attends
        causally)."""
        if getattr(self.model.config.get_text_config(), "use_bidirectional_attention", False):
            raise ValueError("LLM-stage compression does not support Gemma 3 with use_bidirectional_attention "
                             "(every token attends in both directions)")
        types = self._call.get("token_type_ids")
        if types is None:
            return None
        if types.shape[1] != length:
            raise ValueError(f"token_type_ids cover {types.shape[1]} positions, the prompt has {length}")
        image = types == 1
        start = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        return torch.where(image, start.long().cumsum(1) - 1, torch.full_like(types, -1, dtype=torch.long))
