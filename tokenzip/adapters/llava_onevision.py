"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower (no CLS), 2-layer MLP projector, AnyRes
tiling, one run of ``image_token_id`` placeholders per image.

What is compressed. The packed LLM-space features, exactly as the stock model would feed them to the LLM: the
output of ``model.model.get_image_features`` (projector applied, base view followed by the AnyRes crop grid after
unpadding and, for ``anyres_max_*``, bilinear down-scaling, with one ``image_newline`` marker closing each row of the
crop grid). An image's budget ``N`` is all of its tokens that would reach the LLM, newline markers included; a method
may drop, keep or merge a marker like any other token (the model has no rule that needs them).

Layout handed to the method, per image:
  * single-image samples (AnyRes): ``[(h, w), (H, W + 1)]`` — the base view's patch grid, then the unpadded crop grid
    whose last column holds the newline markers;
  * samples with several images (the processor's ``batch_num_images > 1``, where the model does not tile):
    ``[(h, w), (1, 1)]`` — the base view and its single trailing newline marker.
Spatial methods (pooling, 2-D neighbourhoods) therefore see the true 2-D structure. ``Item.extra["newline"]`` is
the boolean mask of the markers.

Placeholders. ``LlavaOnevisionProcessor`` writes, per image, ``num_image_tokens`` (base view) + the unpadded (and,
past ``anyres_max_N``, down-scaled) crop grid + one newline per grid row, or ``num_image_tokens + 1`` in samples with
several images — the length of the model's packed features, which is what this adapter counts; prompts whose
placeholder runs do not add up to the images' feature counts get a ValueError naming both.

Signals. SigLIP has no CLS token, so ``cls_attention`` is the attention each patch receives (mean over queries and
heads) at the vision feature layer, recomputed from that layer's own q/k projections (adapters/probe.py; the tower
keeps its SDPA/flash kernel); ``keys`` are that layer's keys (mean over heads). Both are per crop, so they are run
through the model's own ``pack_image_features`` (same crop arrangement, unpadding and interpolation as the features)
with a zero vector in place of ``image_newline``: newline markers get ``cls_attention`` 0 and zero keys. In the
``anyres_max_*`` down-scaled case the signals are bilinearly interpolated like the features. ``projected`` is the
tokens themselves (already in LLM space); ``text`` / ``text_mask`` are the prompt's text embeddings.

The vision tower runs once per call: the probe records the signals during the same ``get_image_features`` pass that
produces the features. The shortened prompt (each image keeps its first ``k`` placeholders) and the compressed
features go to the stock model through ``mm_encoder_outputs`` (no patching of model internals). With ``k == N`` for
every image the LLM receives exactly the original features. Videos (``pixel_values_videos``) are items of modality
``"video"``: see adapters/onevision_video.py (a mixin; images and clips of one call are compressed together).

Like the stock ``forward`` (transformers 5.23), image features use ``config.vision_aspect_ratio``; a
``vision_aspect_ratio`` call argument is ignored by the model, and so it is here, so that ``retain=1`` is lossless.

Stage "encoder" (``tz.InEncoder(method, layer=L)``, or a schedule ``layer=(l1, ..., lm)``). Every crop of every
image (base view and AnyRes crops) is one row of the SigLIP tower, as in the model; the embedding and layers
``0 .. L-1`` run on all of them unchanged. At the cut an image's candidates are its crops' patch tokens that the
model's packing keeps (the unpadded ones), in the packed order: the mapping crop patch -> packed slot comes from the
model's own ``pack_image_features`` run on an index tensor. Where ``anyres_max_*`` down-scales (large images) the
packed tokens are bilinear mixtures with no one-to-one source, so the candidates are the unpadded crop tokens
before down-scaling (that packing is asked for with a ``vision_aspect_ratio`` too large to down-scale). Their
layout is ``[(h, w), (H, W)]`` (base view, unpadded crop grid; no newline column: newline markers do not exist
inside the encoder), ``[(h, w)]`` for an untiled image. Signals at the cut: ``cls_attention``/``keys`` of layer
``L-1`` per crop (the probe above, each crop on its own tokens), ``text``/``text_mask`` as before; ``projected`` is
not available (the projector reads feature-layer tokens).

Budget: unchanged. An image's ``N`` is its packed count with newline markers, ``k = budget.count(N)`` tokens reach
the LLM exactly, and ``last_stats`` reports ``N -> k``. Markers are not encoder tokens, so the method keeps ``k``
candidates; only when ``k`` covers every candidate (near ``retain=1``; with down-scaling: ``k >= N``) is the image
kept whole: it is not compressed in the tower, its crops run in full, and the LLM gets the model's own packing
(``image_newline`` markers included) with the markers past ``k`` dropped — so an image with ``k == N`` gets exactly
the stock features, and a call where every image does (``retain=1``) runs the stock computation (no mask, one
projector call on the same rows): identical logits. Such an image's item is its packed tokens at the cut (markers
as zero vectors), ``k`` of them, which the method returns unchanged (``k >= n``).

After the cut each kept/merged token belongs to the crop of its first source token; the remaining tower layers, up
to the one the LLM reads (``vision_feature_layer``, -1 by default; later layers are never run, nor the unused
``post_layernorm``), run per crop: one row per crop that still has tokens, rows of every image of the call padded to
the longest, with one additive float mask ``[rows, 1, 1, n]``: ``log(size)`` on real keys (ToMe's proportional
attention, arXiv:2210.09461) and the dtype's minimum on padding — the form SDPA and eager both take. Then the
projector, and each image's tokens enter the LLM in the order the method returned them (ascending first source: the
packed order), with the prompt shortened as at the pre-LLM stage, through ``mm_encoder_outputs``. A schedule
compresses at each earlier cut too (the counts go from the candidates to ``k`` with a constant ratio,
:func:`tokenzip.encoder.schedule_counts`); the signals there are computed on each crop row's real tokens (padding
excluded), and after the first cut the tokens no longer tile a grid, so the method gets a 1-D layout. Supported for
one integer ``vision_feature_layer`` with the "full" select strategy (the OneVision configs); videos in the same
call are encoded as the model would and passed through uncompressed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from .. import layout as L
from ..callstate import per_call
from ..encoder import EncoderRunner, MergedTokens
from ..encoder.runner import SCHEDULES, padded_rows
from ..output import CompressOutput
from . import resample
from .attention import ATTENTION_SIGNAL_ORDER, ATTENTION_SIGNALS, attention_signals
from .base import Item
from .llava import LlavaFamily
from .onevision_video import OnevisionVideo
from .placeholders import image_llm_items, items_per_sample, require_input_ids, text_signals
from .probe import capture_input, probe
from .vision import has_cls_token, signal_layer


class LlavaOnevisionAdapter(OnevisionVideo, LlavaFamily):
    """See the module docstring; stage "encoder" below it; videos: adapters/onevision_video.py."""

    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    modalities = ("image", "video")  # videos: adapters/onevision_video.py
    stages = ("pre_llm", "encoder", "llm")
    signals = LlavaFamily.signals | {"anyres_region"}
    encoder_signals = frozenset({"cls_attention", "keys", "text", "text_mask"})
    runner: EncoderRunner | None = None  # stage "encoder": the tower and its cuts (set_encoder_layer)
    step: Any = None  # stage "encoder": the method's budget, and its compression at a schedule's earlier cuts
    _tower_images = per_call()  # stage "encoder": per call (per thread), from encode() to rebuild()

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.media_token_ids = set(self.media_tokens().values())  # placeholders the prompt shortening must keep

    def media_tokens(self) -> dict[str, int]:
        video = getattr(self.model.config, "video_token_id", None)
        return {"image": self.image_token_id, **({"video": int(video)} if video is not None else {})}

    # ---- crop bookkeeping (the model's own rule, see LlavaOnevisionModel.get_image_features) -------------------------
    def crops_per_image(self, pixel_values: torch.Tensor, image_sizes: Any, batch_num_images: Any) -> list[int]:
        """How many vision-tower crops each image has (base view included), validating the media arguments."""
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision needs image_sizes (the (height, width) of each image) next to "
                             "pixel_values; build inputs with LlavaOnevisionProcessor")
        n_images = len(image_sizes)
        if batch_num_images is None:
            patching = [True] * n_images
        else:
            counts = [int(n) for n in batch_num_images]
            if any(n < 0 for n in counts) or sum(counts) != n_images:
                raise ValueError(f"batch_num_images {counts} must be >= 0 and sum to the number of images "
                                 f"({n_images} image_sizes)")
            patching = [n == 1 for n in counts for _ in range(n)]
        cfg = self.model.config
        crops = [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                 if tile else 1 for size, tile in zip(image_sizes, patching)]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != n_images or pixel_values.shape[1] < max(crops, default=0):
                raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} do not fit {n_images} image(s) "
                                 f"needing {crops} crops (image_sizes/batch_num_images)")
        elif pixel_values.dim() == 4:
            if pixel_values.shape[0] != sum(crops):
                raise ValueError(f"pixel_values hold {pixel_values.shape[0]} crops, but image_sizes/batch_num_images "
                                 f"need {sum(crops)} ({crops} per image)")
        else:
            raise ValueError(f"pixel_values must be 4-D or 5-D, got shape {tuple(pixel_values.shape)}")
        return crops

    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        if kwargs.get("pixel_values_videos") is not None:  # clips (and images next to them): onevision_video.py
            return self.encode_media(kwargs, needs)
        input_ids = require_input_ids(kwargs)
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both (the model refuses both)")
        if self.runner is not None:  # stage "encoder" (tz.InEncoder): compress inside the SigLIP tower
            return self._encode_in_tower(kwargs, needs)
        pixel_values = kwargs["pixel_values"]
        image_sizes = kwargs.get("image_sizes")
        batch_num_images = kwargs.get("batch_num_images")
        layer, strategy = self._feature_args(kwargs)
        crops, marks, grids = self.plan(pixel_values, image_sizes, batch_num_images, strategy)
        owner = items_per_sample(input_ids, self.image_token_id, [m.shape[0] for m in marks])  # before the tower
        tower = self.core.vision_tower
        cls = has_cls_token(tower)
        probe_needs = frozenset(needs) & ATTENTION_SIGNALS
        # one pass through the tower: the model's own feature path, with the probe recording the signal layer
        with probe(signal_layer(tower, layer), probe_needs, 0 if cls else None) as p:
            out = self.core.get_image_features(pixel_values, image_sizes, vision_feature_layer=layer,
                                               vision_feature_select_strategy=strategy,
                                               batch_num_images=batch_num_images, return_dict=True)
        feats = list(out.pooler_output)
        if [f.shape[0] for f in feats] != [m.shape[0] for m in marks]:  # adapter bug, not user input
            raise RuntimeError(f"planned {[m.shape[0] for m in marks]} tokens per image, the model gave "
                               f"{[f.shape[0] for f in feats]}")
        drop = 1 if strategy == "default" else 0
        signals = self._pack_signals({name: t[:, drop:] for name, t in p.results.items()}, crops, image_sizes)
        if "anyres_region" in needs:
            for sig, region in zip(signals, self._regions(crops, image_sizes, strategy, pixel_values.device)):
                sig["anyres_region"] = region
        items = []
        for i, f in enumerate(feats):
            sig = {name: t.to(f.device) for name, t in signals[i].items()}  # split device maps: where the tokens are
            if "projected" in needs:
                sig["projected"] = f
            if "text" in needs or "text_mask" in needs:
                sig.update(text_signals(self.core.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                                        self.media_token_ids, owner[i]))
            items.append(Item("image", owner[i], f, grids[i], sig,
                              extra={"newline": marks[i].to(f.device), "crops": crops[i]}))
        return items

    def plan(self, pixel_values: torch.Tensor, image_sizes: Any, batch_num_images: Any, strategy: str
             ) -> tuple[list[int], list[torch.Tensor], list[list[tuple[int, int]]]]:
        """Without running the tower: each image's crop count, the boolean mask of its newline markers among its
        packed tokens (so its token count ``N``) and its layout, from the model's own packing of a dummy tensor."""
        crops = self.crops_per_image(pixel_values, image_sizes, batch_num_images)
        vc = self.model.config.vision_config
        per_crop = (vc.image_size // vc.patch_size) ** 2 + int(has_cls_token(self.core.vision_tower))
        per_crop -= 1 if strategy == "default" else 0
        ones = torch.ones(sum(crops), per_crop, 1, device=pixel_values.device)
        marks = [t[:, 0] < 0.5 for t in self._pack(ones, crops, image_sizes)]
        grids = [self._layout(m, c) for m, c in zip(marks, crops)]
        return crops, marks, grids

    def _pack(self, per_crop: torch.Tensor, crops: list[int], image_sizes: Any, aspect: str | None = None
              ) -> list[torch.Tensor]:
        """Per-crop values ``[sum(crops), P, C]`` arranged like the image features by the model's own
        ``pack_image_features`` (crop grid, unpadding, down-scaling), with zeros as the newline markers
        (``aspect``: another ``vision_aspect_ratio`` than the config's)."""
        aspect = aspect or getattr(self.model.config, "vision_aspect_ratio", None) or "anyres_max_9"
        packed, _ = self.core.pack_image_features(list(torch.split(per_crop, crops, dim=0)), image_sizes,
                                                  image_newline=per_crop.new_zeros(per_crop.shape[-1]),
                                                  vision_aspect_ratio=aspect)
        return list(packed)

    def _pack_signals(self, results: dict[str, torch.Tensor], crops: list[int], image_sizes: Any
                      ) -> list[dict[str, torch.Tensor]]:
        """The probe's per-crop ``cls_attention`` ``[crops, P]`` / ``keys`` ``[crops, P, d]`` arranged like the
        features, in one packing call (the signals ride as channels)."""
        if not results:
            return [{} for _ in crops]
        names = [(name, results[name]) for name in ATTENTION_SIGNAL_ORDER if name in results]
        chans = [t.float().unsqueeze(-1) if t.dim() == 2 else t.float() for _, t in names]
        packed = self._pack(torch.cat(chans, dim=-1), crops, image_sizes)
        out = []
        for t in packed:
            d: dict[str, torch.Tensor] = {}
            start = 0
            for (name, _), c in zip(names, chans):
                width = c.shape[-1]
                d[name] = t[:, start] if name == "cls_attention" else t[:, start: start + width]
                start += width
            out.append(d)
        return out

    def _regions(self, crops: list[int], image_sizes: Any, strategy: str, device: torch.device
                 ) -> list[torch.Tensor]:
        """Each image's ``anyres_region`` signal: the crop index of every packed token (0 = base view, ``j`` = crop
        ``j``, -1 = newline marker), from the model's own packing of per-crop constants (crop index + 1; newlines
        are zeros); where the packing downscales the grid, a border token is rounded to the nearest crop."""
        vc = self.model.config.vision_config
        per_crop = (vc.image_size // vc.patch_size) ** 2 + int(has_cls_token(self.core.vision_tower))
        per_crop -= 1 if strategy == "default" else 0
        ids = torch.cat([torch.arange(c, dtype=torch.float32, device=device) + 1 for c in crops])
        packed = self._pack(ids[:, None, None].expand(-1, per_crop, 1).contiguous(), crops, image_sizes)
        return [t[:, 0].round() - 1 for t in packed]

    def _layout(self, newline: torch.Tensor, crops: int) -> L.Layout:
        """Base view + crop grid with its newline column (``[(h, w), (H, W + 1)]``) for a tiled image, base view +
        one newline marker (``[(h, w), (1, 1)]``) for an untiled one (see module doc)."""
        n = newline.shape[0]
        pos = newline.nonzero().flatten().tolist()
        if crops <= 1:
            if pos != [n - 1]:
                raise RuntimeError(f"expected one trailing newline marker, found {pos[:6]}")  # adapter bug
            side = math.isqrt(n - 1)
            h, w = (side, side) if side * side == n - 1 else (1, n - 1)
            return L.Layout([L.Segment("base", 1, h, w), L.Segment("newline", 1, 1, 1)])
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size  # the model checks the base view is side x side when tiling
        rows = len(pos)
        width1 = (n - side * side) // max(rows, 1)
        if rows == 0 or pos != [side * side + (r + 1) * width1 - 1 for r in range(rows)]:
            raise RuntimeError(f"unexpected newline positions {pos[:6]}... for {n} tokens")  # adapter bug
        return L.Layout([L.Segment("base", 1, side, side), L.Segment("crops", 1, rows, width1, newline=True)])

    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        if any(item.modality == "video" for item in items):  # clips (and images next to them): onevision_video.py
            return self.rebuild_media(kwargs, items, outputs)
        feats = [out.tokens[0] for out in outputs] if self.runner is None else self._finish_in_tower(kwargs, outputs)
        new = self._shorten_prompt(kwargs, items, outputs, self.media_token_ids)
        for key in ("pixel_values", "image_sizes", "batch_num_images"):
            new.pop(key, None)
        new["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}
        return new

    # ---- stage "llm" (tokenzip.llm): each image's placeholder run (newline tokens included), planned without the tower
    def llm_items(self, kwargs: dict[str, Any]) -> list:
        def plan() -> tuple[list[int], list]:
            _, strategy = self._feature_args(kwargs)
            _, marks, grids = self.plan(kwargs["pixel_values"], kwargs.get("image_sizes"),
                                        kwargs.get("batch_num_images"), strategy)
            return [int(m.shape[0]) for m in marks], grids

        items = image_llm_items(kwargs, self.image_token_id, plan) + self.video_llm_items(kwargs)  # clips: the mixin
        return sorted(items, key=lambda it: (it.sample, int(it.positions[0])))  # sequence order, images and clips mixed

    # ---- stage "input" (tokenzip.base.InputCompressor): fewer AnyRes crops (adapters/resample.py) --------------------
    # and fewer frames of each video clip ("frames": adapters/onevision_video.py)
    input_reductions = ("crops", "frames")
    input_keeps_media = False  # the reduced call carries precomputed features (crops; frames keep pixels)

    def input_plan(self, kwargs: dict[str, Any], reduction: str) -> list:
        if reduction == "frames":
            return self.video_input_plan(kwargs)
        return resample.onevision_input_plan(self, kwargs, reduction)

    def rescale_inputs(self, kwargs: dict[str, Any], reduction: str, items: list, targets: list[int]
                       ) -> tuple[dict[str, Any], list]:
        if reduction == "frames":
            return self.video_rescale_inputs(kwargs, items, targets)
        return resample.onevision_rescale_inputs(self, kwargs, items, targets)

    # ---- stage "encoder" (tz.InEncoder): compression inside the SigLIP tower, see the class docstring -------------
    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        cfg = self.model.config
        if not isinstance(cfg.vision_feature_layer, int) or cfg.vision_feature_select_strategy != "full":
            raise ValueError("LLaVA-OneVision's encoder stage needs one integer vision_feature_layer and the 'full' "
                             f"select strategy (SigLIP has no [CLS]); this config has {cfg.vision_feature_layer!r} / "
                             f"{cfg.vision_feature_select_strategy!r}")
        if step is None:
            raise ValueError("LLaVA-OneVision's encoder stage needs the method's budget (the compression step "
                             "tz.InEncoder passes): an image's count includes newline markers the tower does not have")
        runner = EncoderRunner(self._tower_spec(), layer)  # ValueError naming the valid cuts
        self.runner, self.step = runner, step

    def release(self) -> None:
        self._tower_images = None

    def _crop_pixels(self, pixel_values: torch.Tensor, crops: list[int]) -> torch.Tensor:
        """The tower batch ``[sum(crops), C, H, W]``, as ``get_image_features`` builds it."""
        if pixel_values.dim() == 5:
            return torch.cat([pv[:n] for pv, n in zip(pixel_values, crops)], dim=0)
        return pixel_values

    def _candidates(self, crops: list[int], image_sizes: Any) -> tuple[list[torch.Tensor], list[L.Layout]]:
        """Per image: the crop-local index (``crop * P + patch``) of each crop token the model's packing keeps
        (unpadding), in packed order, and their layout (base view, then the unpadded crop grid without newline
        column). From the model's own ``pack_image_features`` on an index tensor, with a ``vision_aspect_ratio`` so
        large that nothing is down-scaled (down-scaling interpolates: its inputs are the candidates)."""
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        per_crop = side * side
        total = sum(crops) * per_crop
        ids = torch.arange(1, total + 1).view(sum(crops), per_crop, 1)  # 0 is the newline marker
        packed = self._pack(ids, crops, image_sizes, aspect=f"anyres_max_{total + 1}")
        out, layouts, start = [], [], 0
        for n, t in zip(crops, packed):
            values = t[:, 0]
            marker = values == 0
            cand = values[~marker] - 1 - start * per_crop
            start += n
            rows = int(marker.sum())
            base = L.Segment("base", 1, side, side)
            if n <= 1:
                layouts.append(L.Layout([base]))
            else:
                width = (cand.numel() - per_crop) // rows
                if rows * width != cand.numel() - per_crop:  # adapter bug, not user input
                    raise RuntimeError(f"unpadded crop tokens {cand.numel() - per_crop} do not form {rows} rows")
                layouts.append(L.Layout([base, L.Segment("crops", 1, rows, width)]))
            out.append(cand)
        return out, layouts

    @torch.no_grad()
    def _encode_in_tower(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        """Stage "encoder": the tower up to the (last) cut, compressing at the earlier cuts of a schedule; one item
        per image (see the class docstring)."""
        input_ids = kwargs["input_ids"]
        pixel_values = kwargs["pixel_values"]
        image_sizes = kwargs.get("image_sizes")
        layer, strategy = self._feature_args(kwargs)
        cfg = self.model.config
        if (layer, strategy) != (cfg.vision_feature_layer, cfg.vision_feature_select_strategy):
            raise ValueError("the encoder stage was set up for the config's vision_feature_layer/select_strategy; "
                             "a call cannot override them")
        crops, marks, grids = self.plan(pixel_values, image_sizes, kwargs.get("batch_num_images"), strategy)
        owner = items_per_sample(input_ids, self.image_token_id, [m.shape[0] for m in marks])
        candidates, cand_grids = self._candidates(crops, image_sizes)
        runner = self.runner
        cuts = runner.cuts
        vc = cfg.vision_config
        per_crop = (vc.image_size // vc.patch_size) ** 2
        images: list[_TowerImage] = []
        start = 0
        for n, mark, cand in zip(crops, marks, candidates):
            n_llm = int(mark.shape[0])
            k = int(self.step.count(n_llm))
            whole = k >= cand.numel() or k >= n_llm
            keep = None
            if whole:  # newline markers past the budget are dropped (only when k < N, i.e. not down-scaled)
                dropped = mark & (mark.cumsum(0) > int(mark.sum()) - (n_llm - k))
                keep = ~dropped
            counts = [] if whole else SCHEDULES[self.step.schedule](cand.numel(), k, len(cuts))
            images.append(_TowerImage(rows=slice(start, start + n), n_llm=n_llm, k=k, whole=whole, keep=keep,
                                      counts=counts, crop=(cand // per_crop).to(pixel_values.device)))
            start += n
        embed = self.core.get_input_embeddings()
        text = [text_signals(embed, input_ids, kwargs.get("attention_mask"), self.media_token_ids, s)
                if ("text" in needs or "text_mask" in needs) else {} for s in owner]
        # the first span: every crop in full, as the model runs its tower
        hidden = runner.run(runner.embed(self._crop_pixels(pixel_values, crops)), 0, cuts[0] - 1)
        with probe(runner.span_attention(cuts[0]), needs, None) as p:
            hidden = runner.run(hidden, cuts[0] - 1, cuts[0])
        signals: list[dict[str, torch.Tensor]] = []
        for im, cand in zip(images, candidates):
            cand = cand.to(hidden.device)
            mine = {name: t[im.rows] for name, t in p.results.items()}
            if im.whole:
                im.hidden = hidden[im.rows]
                signals.append(mine)
            else:
                im.state = MergedTokens.start(hidden[im.rows].flatten(0, 1)[cand].unsqueeze(0))
                signals.append({name: t.flatten(0, 1)[cand] for name, t in mine.items()})
        for j in range(len(cuts)):
            if j > 0:
                signals = self._tower_span(images, cuts[j - 1], cuts[j], needs)
            if j == len(cuts) - 1:
                break
            for i, im in enumerate(images):  # a schedule's earlier cuts: each compressed image a little
                if im.whole:
                    continue
                n = im.state.hidden.shape[1]
                layout = cand_grids[i] if j == 0 else L.grid(1, n)
                sig = {name: t.unsqueeze(0) for name, t in {**signals[i], **text[i]}.items()}
                out = self.step(im.state.hidden, im.counts[j], layout, sig)
                im.crop = im.crop[out.index[0]]
                im.state = im.state.after([out])
        self._tower_images = images
        items = []
        for i, im in enumerate(images):
            if im.whole:  # the model's own packing of its crops at the cut, markers as zeros; the method keeps all
                sizes = image_sizes[i: i + 1]
                tokens = self._pack(im.hidden, [im.hidden.shape[0]], sizes)[0][im.keep]
                sig = {name: t[im.keep] for name, t in self._pack_signals(signals[i], [im.hidden.shape[0]],
                                                                          sizes)[0].items()}
                grid = _kept_markers_layout(grids[i], int((marks[i] & im.keep).sum()))
            else:
                tokens, sig = im.state.hidden[0], signals[i]
                grid = cand_grids[i] if len(cuts) == 1 else L.grid(1, tokens.shape[0])
            items.append(Item("image", owner[i], tokens, grid, {**sig, **text[i]},
                              extra={"tokens_in": im.n_llm, "k": im.k if not im.whole else tokens.shape[0]}))
        return items

    def _tower_rows(self, images: list[_TowerImage]) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple]]:
        """Every image's tokens as tower rows, one per crop (a kept/merged token belongs to the crop of its first
        source), padded to the longest row with the key-padding + proportional-attention mask; and each row's
        ``(image, crop, slots)`` (``slots`` None: a whole crop)."""
        rows, sizes, where = [], [], []
        for i, im in enumerate(images):
            if im.whole:
                for c in range(im.hidden.shape[0]):
                    rows.append(im.hidden[c])
                    sizes.append(None)
                    where.append((i, c, None))
                continue
            for c in torch.unique(im.crop).tolist():  # sorted: crop order, and slot order within a crop
                slots = (im.crop == c).nonzero().flatten()
                rows.append(im.state.hidden[0, slots])
                sizes.append(im.state.size[0, slots])
                where.append((i, c, slots))
        hidden, mask = padded_rows(rows, sizes)
        return hidden, mask, where

    def _tower_span(self, images: list[_TowerImage], start: int, stop: int, needs: frozenset[str]
                    ) -> list[dict[str, torch.Tensor]]:
        """Layers ``start .. stop - 1`` on the images' rows (their states updated in place) and the signals of layer
        ``stop - 1`` per image, each row on its real tokens only (the padding must not count)."""
        runner = self.runner
        hidden, mask, where = self._tower_rows(images)
        hidden = runner.run(hidden, start, stop - 1, mask)
        with capture_input(runner.span_attention(stop)) as box:
            hidden = runner.run(hidden, stop - 1, stop, mask)
        whole_rows: dict[int, list[int]] = {}
        per_row: list[dict[str, torch.Tensor]] = []
        for r, (i, _, slots) in enumerate(where):
            n = hidden.shape[1] if slots is None else slots.numel()
            per_row.append({name: t[0] for name, t in attention_signals(
                runner.span_attention(stop), box["x"][r: r + 1, :n], needs, None,
                k_out=box["k"][r: r + 1, :n]).items()})
            if slots is None:
                whole_rows.setdefault(i, []).append(r)
            else:
                images[i].state.hidden[0, slots] = hidden[r, :n]
        out: list[dict[str, torch.Tensor]] = []
        for i, im in enumerate(images):
            if im.whole:
                im.hidden = hidden[whole_rows[i]]
                out.append({name: torch.stack([per_row[r][name] for r in whole_rows[i]])
                            for name in per_row[whole_rows[i][0]]})
                continue
            n = im.state.hidden.shape[1]
            sig: dict[str, torch.Tensor] = {}
            for r, (owner, _, slots) in enumerate(where):
                if owner != i:
                    continue
                for name, t in per_row[r].items():
                    if name not in sig:
                        sig[name] = t.new_zeros((n, *t.shape[1:]))
                    sig[name][slots] = t
            out.append(sig)
        return out

    @torch.no_grad()
    def _finish_in_tower(self, kwargs: dict[str, Any], outputs: list[CompressOutput]) -> list[torch.Tensor]:
        """The tower layers after the (last) cut, up to the feature layer, on each image's rows, then the projector:
        per image its tokens in the method's order, or, for an image kept whole, the model's own packing of its
        crops (``image_newline`` markers; those past the budget dropped)."""
        images = self._tower_images
        for im, out in zip(images, outputs):
            if not im.whole:
                im.crop = im.crop[out.index[0]]
                im.state = im.state.after([out])
        runner = self.runner
        hidden, mask, where = self._tower_rows(images)
        hidden = runner.run(hidden, runner.cuts[-1], len(runner.spec.layers), mask)
        feats = self.core.multi_modal_projector(hidden)  # one call on the rows, as get_image_features does
        aspect = getattr(self.model.config, "vision_aspect_ratio", None) or "anyres_max_9"
        image_sizes = kwargs.get("image_sizes")
        out: list[torch.Tensor] = []
        for i, im in enumerate(images):
            rows = [(r, slots) for r, (owner, _, slots) in enumerate(where) if owner == i]
            if im.whole:
                crops = feats[[r for r, _ in rows], : im.hidden.shape[1]]
                packed, _ = self.core.pack_image_features([crops], image_sizes[i: i + 1],
                                                          image_newline=self.core.image_newline,
                                                          vision_aspect_ratio=aspect)
                out.append(packed[0][im.keep])
                continue
            tokens = feats.new_empty(im.state.hidden.shape[1], feats.shape[-1])
            for r, slots in rows:
                tokens[slots] = feats[r, : slots.numel()]
            out.append(tokens)
        return out


@dataclass
class _TowerImage:
    """One image inside the tower (stage "encoder"), from encode() to rebuild()."""

    rows: slice  # its crops' rows in the tower batch
    n_llm: int  # N: its packed count, newline markers included
    k: int  # the tokens that reach the LLM
    whole: bool  # k covers every candidate (or N): not compressed inside the tower
    keep: torch.Tensor | None  # whole: which of the N packed tokens reach the LLM (markers past k dropped)
    counts: list[int]  # compressed: the token count after each cut
    crop: torch.Tensor  # compressed: [n] the crop of each current token (that of its first source)
    hidden: torch.Tensor | None = None  # whole: [crops, P, D] its crop rows
    state: MergedTokens | None = None  # compressed: its current tokens, sizes and source over the candidates


def _kept_markers_layout(grid: L.Layout, markers: int) -> L.Layout:
    """``grid`` (base view + crop grid with its newline column, or + one newline) with only the first ``markers``
    newline markers."""
    segments = []
    for s in grid.segments:
        if s.kind == "newline":
            segments += [s] if markers > 0 else []
        elif s.newline and markers < s.h:
            segments += [L.Segment(s.kind, 1, markers, s.w, newline=True)] if markers > 0 else []
            segments.append(L.Segment(s.kind, 1, s.h - markers, s.w - 1))
        else:
            segments.append(s)
    return L.Layout(segments)
