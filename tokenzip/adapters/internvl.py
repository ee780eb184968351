"""InternVL3 / InternVL3.5 (``InternVLForConditionalGeneration``): InternViT tower ([CLS] + 14-px patches of 448-px
tiles), [CLS] dropped, ``pixel_shuffle`` (each 2x2 group of patches becomes one token of 4x the width), LayerNorm +
MLP projector: 256 LLM tokens per tile. An image is 1-12 tiles, plus a thumbnail (the LAST tile) when it has more
than one; a video is frames as single tiles.

Placeholders. The processor writes ``<img>`` + ``IMG_CONTEXT`` x (256 * tiles) + ``</img>`` per image and
``Frame{i}: <img>`` + ``IMG_CONTEXT`` x 256 + ``</img>`` per video frame, and concatenates every tile of the call,
images and frames alike, into one ``pixel_values`` in prompt order. The model knows only ``image_token_id``
(IMG_CONTEXT): a contiguous run of it is one ``<img>...</img>`` block, ``tiles = run / 256``. The ``<img>``/``</img>``
markers (and ``Frame{i}:``) are text to this adapter: they stay, only the IMG_CONTEXT runs shrink.

Items. One item per image (all its tiles, thumbnail included), layout: one ``crops`` segment per tile and a ``base``
segment for the thumbnail (a single-tile image: one ``image`` grid), each ``(h, w)`` the tile's grid after the pixel
shuffle (16 x 16). Video: the model's inputs do not say which blocks are video frames (the processor merges the
frames into ``pixel_values`` and marks their placeholders like an image's), so a call says it with
``mm_token_type_ids`` (transformers' convention: 2 for video; the stock model ignores the argument, and generate()
extends it): a block whose placeholders are 2 is a video frame (one tile), and consecutive frames of a sample whose
tokens in between (``</img>``, ``Frame{i}:``, ``<img>``) are 2 as well form one clip — mark a clip's whole span, as
the processor expands ``<video>``. A clip is an item of modality ``"video"`` with layout ``frames(T, h, w)``, so
temporal methods see its time axis. Without ``mm_token_type_ids`` every block is an image item.

What is compressed (stage ``pre_llm``). The projector output (``get_image_features``), i.e. exactly the tokens the
LLM reads; ``projected`` is the tokens themselves. Signals come from the layer whose output the LLM reads
(``vision_feature_layer``): ``cls_attention`` is the [CLS] row of its attention (mean over heads) and ``keys`` its
keys (mean over heads), recomputed from that layer's own q/k projections and q/k norms on the input a hook captured
(the tower keeps its SDPA kernel); a token's value is the sum (``cls_attention``) or the mean (``keys``) over its
2x2 patch group, the patches the pixel shuffle stacked into it. The compressed features go to the stock model through
``mm_encoder_outputs`` as ONE tensor ``[1, kept, D]`` (the model calls ``.to()`` on ``pooler_output`` and checks
only its element count against the placeholders, which it fills in order), with each block's run shortened to its
kept count. In a clip a kept token stays in its own frame's run (a merged one: in its first member's frame), so a
frame's ``Frame{i}: <img>...</img>`` still frames its own tokens; a frame that keeps nothing keeps its markers.

Stage ``encoder`` (``tz.InEncoder(method, layer=L)``, or a schedule). The pixel shuffle turns each 2x2 group of ViT
patches into one LLM token, so a cut inside the ViT compresses whole groups: the candidates are the 2x2 groups
(256 per tile), each as its 4 patches' hidden states concatenated in the pixel shuffle's channel order (``[n, 4 *
D_vit]``; exactly what the pixel shuffle would make of them at that layer). A budget is the LLM tokens of the item,
which equals its group count, so a kept group is one LLM token after the tower. Selecting a group keeps its 4
patches; merging groups averages them patch by patch (patch ``j`` with patch ``j``), so a merged group is still 4
patches, each standing for ``size`` groups. The later layers run per tile, as in the model: each row is the tile's
[CLS] token (it stays: it is not a feature, and later layers attend to it) and the 4 patches of every group assigned to
that tile (a merged group: its first member's tile), with ToMe's proportional attention (``log size``, InternViT's
layers take no mask argument, so the additive mask goes to the layer's own attention module through a keyword
pre-hook while the layer runs). After the layer the LLM reads (and the tower's final norm when that is the last
one), each group's 4 patches are its pixel-shuffled token and go through the projector. Layers after the feature layer
are never run. ``projected`` is not offered inside the tower (the projector takes feature-layer tokens). A schedule
of cuts compresses at the earlier cuts only the items of a modality the method takes (the others pass whole), with a
1-D layout after the first cut; a clip's kept group goes to the run of the frame (tile) it is tracked to.

Stage ``input`` (reduction ``"crops"``, ``tz.get("crops")``): an image of ``T > 1`` tiles can be given as its
thumbnail alone (256 tokens); the other tiles are never encoded. Its run keeps 256 placeholders and the call keeps
its pixels (the thumbnail's rows), so a pre-LLM or encoder-stage method can follow in ``tz.compose``. The thumbnail
tokens are the uncompressed call's own (tiles are encoded independently). Single-tile images and video frames are not
input items (there is nothing to drop). This assumes the processor's default ``use_thumbnail=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import layout as L
from .. import timing
from ..encoder import EncoderRunner, EncoderSpec, MergedTokens
from ..encoder.runner import padded_rows
from ..llm.adapter import LLMAccess
from ..llm.hooks import LLMItem
from ..llm.scores import softmax_rows
from ..output import CompressOutput
from .attention import ATTENTION_SIGNALS
from .base import Adapter, InputItem, Item, ModelParts
from .placeholders import pad_id_for, placeholder_keep_mask, require_input_ids, shrink_sequences, text_signals
from .probe import capture_input
from .vision import encoder_layers

VIDEO_TYPE = 2  # ``mm_token_type_ids`` at video placeholders (transformers: 0 text, 1 image, 2 video, 3 audio)


@dataclass
class _Run:
    """One ``<img>...</img>`` block: its run of placeholders in the prompt."""

    sample: int
    start: int  # sequence position of its first placeholder
    length: int
    video: bool


@dataclass
class _Block:
    """One item: an image (one run) or a clip (the consecutive video runs of a sample, one tile each)."""

    modality: str
    sample: int
    runs: list[_Run]
    first_tile: int = 0  # its first row in ``pixel_values`` (when the call carries pixels)
    tiles: int = 0
    layout: L.Layout | None = None

    @property
    def length(self) -> int:
        return sum(r.length for r in self.runs)


@dataclass
class _TowerItem:
    """Stage "encoder": one item inside the tower, from encode() to rebuild()."""

    block: _Block
    state: MergedTokens  # [1, n, 4 * D] its current groups, their sizes and sources over the candidate groups
    tile: torch.Tensor  # [n] each current group's tile (local index; a merged group: its first member's)
    signals: dict[str, torch.Tensor] = field(default_factory=dict)


def _runs(input_ids: torch.Tensor, token_id: int, types: torch.Tensor | None) -> list[_Run]:
    """Every contiguous run of ``token_id`` in ``input_ids`` ``[B, L]``, batch-major and in sequence order (the
    order the model's ``masked_scatter`` fills them)."""
    if types is not None and (not isinstance(types, torch.Tensor) or types.shape != input_ids.shape):
        raise ValueError(f"mm_token_type_ids must be a [B, L] tensor like input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(getattr(types, 'shape', ()))}")
    out: list[_Run] = []
    for b in range(input_ids.shape[0]):
        flag = (input_ids[b] == token_id).int()
        starts = (torch.diff(flag, prepend=flag.new_zeros(1)) == 1).nonzero().flatten().tolist()
        ends = (torch.diff(flag, append=flag.new_zeros(1)) == -1).nonzero().flatten().tolist()
        for s, e in zip(starts, ends):
            video = False
            if types is not None:
                t = types[b, s: e + 1]
                video = bool((t == VIDEO_TYPE).all())
                if not video and bool((t == VIDEO_TYPE).any()):
                    raise ValueError(f"mm_token_type_ids marks only part of the <img> block at position {s} of "
                                     f"sample {b} as video ({VIDEO_TYPE}); a block is all video or all image")
            out.append(_Run(b, s, e - s + 1, video))
    return out


def _blocks(runs: list[_Run], types: torch.Tensor | None) -> list[_Block]:
    """Runs grouped into items: an image per image run; a clip per sequence of video runs of a sample whose tokens in
    between (markers, ``Frame{i}:`` text) are marked video too."""
    out: list[_Block] = []
    for r in runs:
        last = out[-1] if out else None
        if r.video and last is not None and last.modality == "video" and last.sample == r.sample:
            prev = last.runs[-1]
            between = types[r.sample, prev.start + prev.length: r.start]
            if bool((between == VIDEO_TYPE).all()):
                last.runs.append(r)
                continue
        out.append(_Block("video" if r.video else "image", r.sample, [r]))
    return out


def _pixel_groups(core: torch.nn.Module, h: int, w: int, ratio: float) -> torch.Tensor:
    """``[U, 4]`` the patch indices (row-major over the ``h x w`` patch grid) that the model's own ``pixel_shuffle``
    stacks into each of its ``U`` tokens, in channel order: the shuffle run on an index map."""
    ids = torch.arange(h * w, dtype=torch.float64).view(1, h, w, 1)
    shuffled = core.pixel_shuffle(ids, scale_factor=ratio)
    return shuffled.reshape(-1, shuffled.shape[-1]).round().long()


def vit_signals(attn: torch.nn.Module, x: torch.Tensor, needs: frozenset[str]) -> dict[str, torch.Tensor]:
    """``cls_attention`` ``[B, N]`` (the [CLS] row at index 0, mean over heads) and ``keys`` ``[B, N, head_dim]``
    (mean over heads) of an InternViT attention module on its input ``x`` ``[B, N, D]``, from its own q/k projections
    and q/k norms (InternViT normalises q and k over the full width, before splitting heads)."""
    if not (ATTENTION_SIGNALS & needs):
        return {}
    with torch.no_grad(), timing.span("signals"):
        b, n, _ = x.shape
        heads, d = int(attn.num_heads), int(attn.head_dim)
        k = attn.k_norm(attn.k_proj(x)).view(b, n, heads, d).transpose(1, 2).float()
        out: dict[str, torch.Tensor] = {}
        if "keys" in needs:
            out["keys"] = k.mean(dim=1)
        if "cls_attention" in needs:
            q = attn.q_norm(attn.q_proj(x[:, :1])).view(b, 1, heads, d).transpose(1, 2).float()
            out["cls_attention"] = softmax_rows(q, k, float(attn.scale)).mean(dim=(1, 2))
        return out


def _group_signals(signals: dict[str, torch.Tensor], groups: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-patch signals ``[..., P(, d)]`` (no [CLS] column) as per-token ones: ``cls_attention`` summed and ``keys``
    averaged over each token's patch group ``groups`` ``[U, 4]``."""
    out = {}
    for name, t in signals.items():
        g = t[..., groups] if name == "cls_attention" else t[..., groups, :]
        out[name] = g.sum(dim=-1) if name == "cls_attention" else g.mean(dim=-2)
    return out


def _run_masked(layer: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One InternViT layer with an additive attention ``mask``: the layer's forward takes none, so the mask reaches
    its attention module (which takes ``attention_mask``) through a keyword pre-hook removed right after."""
    if mask is None:
        return layer(hidden)

    def inject(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "attention_mask": mask}

    handle = layer.attention.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        return layer(hidden)
    finally:
        handle.remove()


class InternVLAdapter(LLMAccess, Adapter):
    """InternVL3 / InternVL3.5; see the module docstring for the design."""

    model_classes = ("InternVLForConditionalGeneration",)
    modalities = ("image", "video")
    stages = ("pre_llm", "encoder", "llm")
    signals = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})
    encoder_signals = frozenset({"cls_attention", "keys", "text", "text_mask"})
    input_reductions = ("crops",)
    input_stage_note = "InternVL drops an image's tiles and keeps its thumbnail (reduction 'crops')"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.core = model.model
        self.image_token_id = int(model.config.image_token_id)
        self.runner: EncoderRunner | None = None
        self.step: Any = None
        self._tower: list[_TowerItem] | None = None
        self._cls: torch.Tensor | None = None  # [tiles, D] each tile's [CLS] hidden state inside the tower
        self._types: torch.Tensor | None = None  # the call's mm_token_type_ids (begin_call), shortened with it
        self._compressed = False  # this call's features are tokenzip's compressed ones (rebuild ran)

    # ---- structure -----------------------------------------------------------------------------------------------
    def parts(self) -> ModelParts:
        core = self.core
        lm = core.language_model
        return ModelParts(encoder=core.vision_tower, encoder_layers=encoder_layers(core.vision_tower),
                          projector=core.multi_modal_projector, language_model=lm, decoder_layers=lm.layers,
                          final_norm=lm.norm, embed=core.get_input_embeddings(),
                          media_token_ids={"image": self.image_token_id, "video": self.image_token_id})

    def has_media(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None

    def batch_size(self, kwargs: dict[str, Any]) -> int:
        return require_input_ids(kwargs).shape[0]

    def encoder_depth(self) -> int:
        """The tower layers the encoder stage runs: up to the one whose output the LLM reads."""
        count = len(encoder_layers(self.core.vision_tower))
        return int(self.model.config.vision_feature_layer) % (count + 1)

    def _feature_args(self, kwargs: dict[str, Any]) -> tuple[int, str]:
        cfg = self.model.config
        layer = kwargs.get("vision_feature_layer")
        strategy = kwargs.get("vision_feature_select_strategy")
        layer = cfg.vision_feature_layer if layer is None else layer
        strategy = cfg.vision_feature_select_strategy if strategy is None else strategy
        if isinstance(layer, bool) or not isinstance(layer, int) or strategy != "default":
            raise ValueError("InternVL's pixel shuffle takes one integer vision_feature_layer and the 'default' "
                             f"select strategy ([CLS] dropped); got {layer!r} / {strategy!r}")
        return layer, strategy

    # ---- the video marking (mm_token_type_ids) ------------------------------------------------------------------
    def begin_call(self, kwargs: dict[str, Any]) -> None:
        """The stock model takes no ``mm_token_type_ids`` (its ``generate()`` refuses the argument, its ``forward()``
        ignores it), so the adapter takes it out of the call and keeps it for the call's stages; the calls it
        rebuilds carry it shortened with the prompt (``_shrink``)."""
        types = kwargs.pop("mm_token_type_ids", None)
        if types is not None and (not isinstance(types, torch.Tensor) or types.dim() != 2):
            raise ValueError(f"mm_token_type_ids must be a [B, L] tensor, got {tuple(getattr(types, 'shape', ()))}")
        self._types = types

    def _blocks(self, kwargs: dict[str, Any]) -> list[_Block]:
        input_ids = require_input_ids(kwargs)
        types = kwargs.get("mm_token_type_ids", self._types)
        if types is not None and kwargs.get("mm_token_type_ids") is None and types.shape != input_ids.shape:
            types = None  # the call's noted marking is for another sequence (a decoding step)
        return _blocks(_runs(input_ids, self.image_token_id, types), types)

    def _shrink(self, kwargs: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        """``shrink_sequences`` of the call, and of the call's video marking with it."""
        types = kwargs.get("mm_token_type_ids", self._types)
        full = dict(kwargs) if types is None else {**kwargs, "mm_token_type_ids": types}
        new = shrink_sequences(full, keep, pad_id_for(self.model.config, {self.image_token_id}))
        self._types = new.pop("mm_token_type_ids", None)
        return new

    def _tile_grid(self, pixel_values: torch.Tensor | None) -> tuple[int, int, int]:
        """``(h, w, U)``: a tile's token grid after the pixel shuffle and its token count (without pixels: for the
        config's tile size)."""
        vc = self.model.config.vision_config
        patch, size = vc.patch_size, vc.image_size
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        sh, sw = (size, size) if isinstance(size, int) else tuple(size)
        if pixel_values is not None:
            sh, sw = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
        ratio = float(self.model.config.downsample_ratio)
        h, w = int(sh // ph * ratio), int(sw // pw * ratio)
        return h, w, h * w

    def _plan(self, kwargs: dict[str, Any], pixels: bool = True) -> list[_Block]:
        """The call's items, each with its tiles in ``pixel_values`` and its layout; ValueErrors name what does not
        match. ``pixels=False``: a call that carries the model's own features of its tiles (``generate()`` encodes
        the media before its first step), whose runs are whole tiles of the config's size."""
        pixel_values = kwargs["pixel_values"] if pixels else None
        if pixels and (not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4):
            raise ValueError("pixel_values must be [tiles, 3, H, W] (every tile of the call in prompt order, as "
                             f"InternVLProcessor builds it), got {tuple(getattr(pixel_values, 'shape', ()))}")
        h, w, per_tile = self._tile_grid(pixel_values)
        blocks = self._blocks(kwargs)
        tile = 0
        for blk in blocks:
            video = blk.modality == "video"
            bad = [r.length for r in blk.runs if r.length % per_tile or (video and r.length != per_tile)]
            if bad:
                what = "a video frame (one tile)" if blk.modality == "video" else "an image (whole tiles)"
                raise ValueError(f"the media do not match the prompt: an <img> block of sample {blk.sample} holds "
                                 f"{bad[0]} placeholders; {what} needs "
                                 f"{'exactly' if blk.modality == 'video' else 'a multiple of'} {per_tile} "
                                 f"({h}x{w} tokens per tile); build inputs with InternVLProcessor")
            blk.first_tile, blk.tiles = tile, blk.length // per_tile
            tile += blk.tiles
            if blk.modality == "video":
                blk.layout = L.frames(blk.tiles, h, w)
            elif blk.tiles == 1:
                blk.layout = L.grid(h, w)
            else:
                blk.layout = L.Layout([L.Segment("crops", 1, h, w)] * (blk.tiles - 1) + [L.Segment("base", 1, h, w)])
        if pixel_values is not None and tile != int(pixel_values.shape[0]):
            raise ValueError(f"the media do not match the prompt: its <img> blocks hold {tile} tiles of {per_tile} "
                             f"placeholders, but pixel_values has {int(pixel_values.shape[0])} tiles; build inputs "
                             "with InternVLProcessor")
        return blocks

    def _groups(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patch = self.model.config.vision_config.patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return _pixel_groups(self.core, int(pixel_values.shape[-2]) // ph, int(pixel_values.shape[-1]) // pw,
                             float(self.model.config.downsample_ratio)).to(pixel_values.device)

    def _text(self, kwargs: dict[str, Any], needs: frozenset[str], sample: int) -> dict[str, torch.Tensor]:
        if "text" not in needs and "text_mask" not in needs:
            return {}
        return text_signals(self.core.get_input_embeddings(), kwargs["input_ids"], kwargs.get("attention_mask"),
                            {self.image_token_id}, sample)

    # ---- stage "pre_llm" -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        if self.runner is not None:
            return self._encode_in_tower(kwargs, needs)
        layer, strategy = self._feature_args(kwargs)
        pixel_values = kwargs["pixel_values"]
        blocks = self._plan(kwargs)
        tower = self.core.vision_tower
        layers = encoder_layers(tower)
        signal_layer = layer % (len(layers) + 1) - 1
        per_patch: dict[str, torch.Tensor] = {}
        if needs & ATTENTION_SIGNALS:
            if signal_layer < 0:
                raise ValueError("vision_feature_layer is the embedding output: there is no attention to read")
            attn = layers[signal_layer].attention
            with capture_input(attn) as box:
                feats = self.core.get_image_features(pixel_values, vision_feature_layer=layer,
                                                     vision_feature_select_strategy=strategy,
                                                     return_dict=True).pooler_output
            per_patch = {name: t[:, 1:] for name, t in vit_signals(attn, box["x"], needs).items()}
        else:
            feats = self.core.get_image_features(pixel_values, vision_feature_layer=layer,
                                                 vision_feature_select_strategy=strategy,
                                                 return_dict=True).pooler_output
        per_token = _group_signals(per_patch, self._groups(pixel_values))
        items = []
        for blk in blocks:
            rows = slice(blk.first_tile, blk.first_tile + blk.tiles)
            tokens = feats[rows].flatten(0, 1)
            sig = {name: t[rows].flatten(0, 1) for name, t in per_token.items()}
            if "projected" in needs:
                sig["projected"] = tokens
            sig.update(self._text(kwargs, needs, blk.sample))
            items.append(Item(blk.modality, blk.sample, tokens, blk.layout, sig, extra={"block": blk}))
        return items

    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        if self.runner is not None:  # each output slot's tile (a frame of a clip) comes from the tower's tracking
            feats = self._finish_in_tower(outputs)
            tiles = [it.tile for it in self._tower]
        else:  # the output's index points at the item's own tokens, 256 per tile
            feats = [o.tokens[0] for o in outputs]
            blocks = [it.extra["block"] for it in items]
            tiles = [o.index[0] // (blk.length // blk.tiles) for o, blk in zip(outputs, blocks)]
        counts: list[list[tuple[int, int]]] = [[] for _ in range(kwargs["input_ids"].shape[0])]
        ordered = []
        for item, tile, tokens in zip(items, tiles, feats):
            blk: _Block = item.extra["block"]
            if len(blk.runs) == 1:
                counts[blk.sample].append((blk.runs[0].length, tokens.shape[0]))
                ordered.append(tokens)
                continue
            # a clip: each kept token stays in its own frame's run (a merged one in its first member's)
            frame = tile.to(tokens.device)
            order = torch.sort(frame, stable=True).indices
            ordered.append(tokens[order])
            per_frame = torch.bincount(frame, minlength=len(blk.runs)).tolist()
            counts[blk.sample] += [(r.length, k) for r, k in zip(blk.runs, per_frame)]
        keep = placeholder_keep_mask(kwargs["input_ids"], self.image_token_id, counts)
        new = self._shrink(kwargs, keep)
        new.pop("pixel_values", None)
        features = torch.cat(ordered, dim=0).unsqueeze(0)  # one tensor, filled into the placeholders in order
        new["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        self._compressed = True
        return new

    # ---- stage "llm" -----------------------------------------------------------------------------------------------
    def llm_items(self, kwargs: dict[str, Any]) -> list[LLMItem]:
        """Each item's placeholder positions: from the prompt's runs (with pixels: their tiles' layouts; after a
        pre-LLM method, ``mm_encoder_outputs``: the shortened runs, 1-D)."""
        input_ids = require_input_ids(kwargs)
        if kwargs.get("pixel_values") is not None:
            blocks = self._plan(kwargs)
        elif (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None:
            # the model's own features (generate() encodes before its first step): whole tiles, with layouts;
            # tokenzip's compressed ones (a pre-LLM method ran in this call): runs of any length, 1-D
            blocks = self._blocks(kwargs) if self._compressed else self._plan(kwargs, pixels=False)
        else:
            return []
        return [LLMItem(blk.modality, blk.sample,
                        torch.cat([torch.arange(r.start, r.start + r.length, device=input_ids.device)
                                   for r in blk.runs]), blk.layout) for blk in blocks]

    # ---- stage "encoder" ---------------------------------------------------------------------------------------------
    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        self._feature_args({})
        runner = EncoderRunner(self._tower_spec(), layer)  # ValueError naming the valid cuts
        if len(runner.cuts) > 1 and step is None:
            raise ValueError("a schedule of encoder cuts needs a compression step for the intermediate cuts")
        self.runner, self.step = runner, step

    def _tower_spec(self) -> EncoderSpec:
        tower = self.core.vision_tower
        depth = self.encoder_depth()
        final = tower.layernorm if int(self.model.config.vision_feature_layer) == -1 else None

        def embed(pixel_values: torch.Tensor) -> torch.Tensor:
            return tower.embeddings(pixel_values.to(tower.dtype))

        return EncoderSpec(embed=embed, layers=encoder_layers(tower)[:depth], run_layer=_run_masked,
                           final_norm=final, attention=lambda layer: layer.attention)

    def release(self) -> None:
        self._tower = None
        self._cls = None
        self._types = None
        self._compressed = False

    @torch.no_grad()
    def _encode_in_tower(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        """The tower up to the (last) cut, compressing each item's 2x2 groups at the earlier cuts of a schedule; one
        item per image / clip whose tokens are its groups (see the module docstring)."""
        layer, strategy = self._feature_args(kwargs)
        cfg = self.model.config
        if (layer, strategy) != (cfg.vision_feature_layer, cfg.vision_feature_select_strategy):
            raise ValueError("the encoder stage was set up for the config's vision_feature_layer/select_strategy; "
                             "a call cannot override them")
        pixel_values = kwargs["pixel_values"]
        blocks = self._plan(kwargs)
        groups = self._groups(pixel_values)
        per_tile = groups.shape[0]
        runner = self.runner
        cuts = runner.cuts
        hidden = runner.run(runner.embed(pixel_values), 0, cuts[0] - 1)
        attn = runner.span_attention(cuts[0])
        with capture_input(attn) as box:
            hidden = runner.run(hidden, cuts[0] - 1, cuts[0])
        per_patch = {name: t[:, 1:] for name, t in vit_signals(attn, box["x"], needs).items()}
        per_token = _group_signals(per_patch, groups)
        self._cls = hidden[:, 0].clone()
        units = hidden[:, 1:][:, groups].flatten(2)  # [tiles, U, 4 * D]: the pixel shuffle of this layer
        text = {blk.sample: self._text(kwargs, needs, blk.sample) for blk in blocks}
        tower: list[_TowerItem] = []
        for blk in blocks:
            rows = slice(blk.first_tile, blk.first_tile + blk.tiles)
            tile = torch.arange(blk.tiles, device=units.device).repeat_interleave(per_tile)
            tower.append(_TowerItem(blk, MergedTokens.start(units[rows].flatten(0, 1).unsqueeze(0)), tile,
                                    {name: t[rows].flatten(0, 1) for name, t in per_token.items()}))
        takes = getattr(self.step, "modalities", None)
        counts = [self.step.counts(blk.length, len(cuts)) if len(cuts) > 1 and (takes is None or blk.modality in takes)
                  else [] for blk in blocks]
        for j in range(1, len(cuts)):  # a schedule's earlier cuts: each item a little, then the next span
            for it, c in zip(tower, counts):
                if not c:  # a modality the method does not compress: whole at every cut
                    continue
                n = it.state.hidden.shape[1]
                layout = it.block.layout if j == 1 else L.grid(1, n)
                sig = {name: t.unsqueeze(0) for name, t in {**it.signals, **text[it.block.sample]}.items()}
                out = self.step(it.state.hidden, c[j - 1], layout, sig)
                it.tile = it.tile[out.index[0]]
                it.state = it.state.after([out])
            self._tower_span(tower, cuts[j - 1], cuts[j], needs)
        self._tower = tower
        items = []
        for it, c in zip(tower, counts):
            n = it.state.hidden.shape[1]
            grid = it.block.layout if not c else L.grid(1, n)
            extra: dict[str, Any] = {"block": it.block, "tokens_in": it.block.length}
            if c:
                extra["k"] = c[-1]
            items.append(Item(it.block.modality, it.block.sample, it.state.hidden[0], grid,
                              {**it.signals, **text[it.block.sample]}, extra=extra))
        return items

    def _tower_rows(self, tower: list[_TowerItem]) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple]]:
        """One row per tile that still has groups: its [CLS] token, then the 4 patches of each of its groups (slot
        order), padded, with the proportional-attention + key-padding mask; and each row's ``(item, tile, slots)``."""
        rows, sizes, where = [], [], []
        for i, it in enumerate(tower):
            d = self._cls.shape[-1]
            for t in torch.unique(it.tile).tolist():
                slots = (it.tile == t).nonzero().flatten()
                patches = it.state.hidden[0, slots].reshape(-1, d)
                rows.append(torch.cat([self._cls[it.block.first_tile + t: it.block.first_tile + t + 1], patches]))
                size = it.state.size[0, slots].repeat_interleave(patches.shape[0] // slots.numel())
                sizes.append(torch.cat([size.new_ones(1), size]))
                where.append((i, t, slots))
        hidden, mask = padded_rows(rows, sizes)
        return hidden, mask, where

    def _tower_span(self, tower: list[_TowerItem], start: int, stop: int, needs: frozenset[str] | None) -> None:
        """Layers ``start .. stop - 1`` on every item's rows (states and [CLS] tokens updated in place); with
        ``needs``, each item's signals of layer ``stop - 1`` (per row on its real tokens: padding must not count)."""
        runner = self.runner
        hidden, mask, where = self._tower_rows(tower)
        box: dict[str, torch.Tensor] = {}
        attn = runner.span_attention(stop)
        if needs is None:
            hidden = runner.run(hidden, start, stop, mask)
        else:
            hidden = runner.run(hidden, start, stop - 1, mask)
            with capture_input(attn) as box:
                hidden = runner.run(hidden, stop - 1, stop, mask)
            for it in tower:
                n = it.state.hidden.shape[1]
                it.signals = {name: t.new_zeros((n, *t.shape[1:])) for name, t in it.signals.items()}
        d = self._cls.shape[-1]
        for r, (i, t, slots) in enumerate(where):
            it = tower[i]
            width = it.state.hidden.shape[-1]
            n = 1 + slots.numel() * (width // d)
            self._cls[it.block.first_tile + t] = hidden[r, 0]
            it.state.hidden[0, slots] = hidden[r, 1:n].reshape(slots.numel(), width).to(it.state.hidden.dtype)
            if needs is None:
                continue
            for name, v in vit_signals(attn, box["x"][r: r + 1, :n], needs).items():
                patch = v[0, 1:].reshape(slots.numel(), width // d, *v.shape[2:])
                it.signals[name][slots] = patch.sum(1) if name == "cls_attention" else patch.mean(1)

    @torch.no_grad()
    def _finish_in_tower(self, outputs: list[CompressOutput]) -> list[torch.Tensor]:
        """The layers after the (last) cut up to the feature layer (and the final norm when that is the tower's last
        output), each group's 4 patches pixel-shuffled into one token, then the projector: per item its tokens in the
        method's slot order."""
        tower = self._tower
        for it, out in zip(tower, outputs):
            it.tile = it.tile[out.index[0].to(it.tile.device)]
            it.state = it.state.after([out])
        runner = self.runner
        self._tower_span(tower, runner.cuts[-1], len(runner.spec.layers), None)
        feats = []
        for it in tower:
            tokens = it.state.hidden[0]
            if runner.spec.final_norm is not None:
                d = self._cls.shape[-1]
                tokens = runner.spec.final_norm(tokens.view(tokens.shape[0], -1, d)).flatten(1)
            feats.append(self.core.multi_modal_projector(tokens))
        return feats

    # ---- stage "input" (reduction "crops"): an image's thumbnail alone --------------------------------------------
    def input_plan(self, kwargs: dict[str, Any], reduction: str) -> list[InputItem]:
        if reduction not in self.input_reductions:
            raise TypeError(self._no_input_stage(reduction))
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both (the model refuses both)")
        blocks = self._plan(kwargs)
        out = []
        for blk in blocks:
            if blk.modality != "image" or blk.tiles < 2:
                continue
            per_tile = blk.length // blk.tiles
            out.append(InputItem("image", blk.sample, blk.length, (per_tile, blk.length), blk.layout,
                                 extra={"block": blk}))
        return out

    def rescale_inputs(self, kwargs: dict[str, Any], reduction: str, items: list[InputItem], targets: list[int]
                       ) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
        if reduction not in self.input_reductions:
            raise TypeError(self._no_input_stage(reduction))
        pixel_values = kwargs["pixel_values"]
        # an item is found again by its first placeholder (the plan is recomputed from the same call)
        target = {(it.extra["block"].sample, it.extra["block"].runs[0].start): (it, k) for it, k in zip(items, targets)}
        counts: list[list[tuple[int, int]]] = [[] for _ in range(kwargs["input_ids"].shape[0])]
        rows, maps = [], []
        for blk in self._plan(kwargs):
            item, k = target.get((blk.sample, blk.runs[0].start), (None, None))
            if item is not None and k < item.tokens:  # the thumbnail (the last tile) alone
                per_tile = blk.length // blk.tiles
                rows.append(pixel_values[blk.first_tile + blk.tiles - 1: blk.first_tile + blk.tiles])
                counts[blk.sample].append((blk.length, per_tile))
                source = torch.full((blk.length,), -1, dtype=torch.long)
                source[blk.length - per_tile:] = torch.arange(per_tile)
                maps.append((source, torch.arange(blk.length - per_tile, blk.length)))
                continue
            rows.append(pixel_values[blk.first_tile: blk.first_tile + blk.tiles])
            counts[blk.sample] += [(r.length, r.length) for r in blk.runs]
            if item is not None:
                maps.append((torch.arange(blk.length), torch.arange(blk.length)))
        keep = placeholder_keep_mask(kwargs["input_ids"], self.image_token_id, counts)
        new = self._shrink(kwargs, keep)
        new["pixel_values"] = torch.cat(rows)
        return new, maps
