"""What LLaVA-NeXT and LLaVA-OneVision share: AnyRes images (a base view and a grid of crops of a high-resolution
version, each crop one row of the vision tower), packed by the model's own ``pack_image_features`` into the base
view's tokens followed by the unpadded crop grid with one ``image_newline`` token closing each grid row (an untiled
image: its base view and one trailing newline). One run of ``image_token_id`` placeholders per image, as long as
its packed features.

:class:`AnyResImages` is the image path of both adapters: the pre-LLM stage (the packed LLM-space features through
``mm_encoder_outputs``), the LLM stage (each image's placeholder run, planned without the tower), the input stage
``"crops"`` (adapters/resample.py) and the encoder stage (one tower row per crop; a [CLS] token, where the tower has
one and the select strategy drops it, stays in every crop row as in LLaVA-1.5's encoder stage). What the two models
do differently is behind a few hooks: how many crops an image has (OneVision leaves images of multi-image samples
untiled, ``batch_num_images``), the call of ``get_image_features`` and ``pack_image_features`` (OneVision's
``vision_aspect_ratio`` down-scaling of large grids). The detailed semantics are in each model's adapter module
(adapters/llava_onevision.py, adapters/llava_next.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .. import layout as L
from ..callstate import per_call
from ..encoder import EncoderRunner, MergedTokens
from ..encoder.runner import SCHEDULES, padded_rows
from ..output import CompressOutput
from . import resample
from .attention import ATTENTION_SIGNAL_ORDER, ATTENTION_SIGNALS, attention_signals
from .base import Item
from .llava import LlavaFamily
from .placeholders import image_llm_items, items_per_sample, require_input_ids, text_signals
from .probe import capture_input, probe
from .vision import has_cls_token, signal_layer


class AnyResImages(LlavaFamily):
    """The AnyRes image path shared by LLaVA-NeXT and LLaVA-OneVision (module doc). Subclasses set ``family`` (the
    model's name in messages) and, where they differ, the hooks ``tiling``, ``image_features`` and
    ``pack_features``; a video mixin placed before this class in the bases provides ``encode_media``,
    ``rebuild_media``, ``video_llm_items`` and ``video_input_plan``/``video_rescale_inputs``."""

    family: ClassVar[str] = "LLaVA AnyRes"
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

    # ---- what the two models do differently (overridden by LLaVA-OneVision) --------------------------------------
    def batch_num_images(self, kwargs: dict[str, Any]) -> Any:
        """The call's per-sample image counts, where the model reads them (LLaVA-NeXT does not: None)."""
        return None

    def tiling(self, n_images: int, batch_num_images: Any) -> list[bool]:
        """Whether each image is tiled (AnyRes crops) or fed as its base view alone; LLaVA-NeXT tiles every image."""
        return [True] * n_images

    def image_features(self, pixel_values: torch.Tensor, image_sizes: Any, layer: Any, strategy: str,
                       batch_num_images: Any) -> list[torch.Tensor]:
        """The model's own packed LLM-space features of each image (``get_image_features``)."""
        return list(self.core.get_image_features(pixel_values, image_sizes, vision_feature_layer=layer,
                                                 vision_feature_select_strategy=strategy,
                                                 return_dict=True).pooler_output)

    def pack_features(self, per_image: list[torch.Tensor], image_sizes: Any, newline: torch.Tensor,
                      aspect: str | None = None) -> list[torch.Tensor]:
        """The model's own ``pack_image_features`` on per-image crop features ``[crops, P, C]`` with ``newline`` as
        the marker (``aspect``: a ``vision_aspect_ratio``, for models that down-scale large grids; ignored here)."""
        strategy = self.model.config.vision_feature_select_strategy  # only chooses a warning in the model
        packed, _ = self.core.pack_image_features(per_image, image_sizes, strategy, image_newline=newline)
        return list(packed)

    # ---- crop bookkeeping (the model's own rule, see get_image_features) -------------------------------------------
    def crops_per_image(self, pixel_values: torch.Tensor, image_sizes: Any, batch_num_images: Any) -> list[int]:
        """How many vision-tower crops each image has (base view included), validating the media arguments."""
        if image_sizes is None:
            raise ValueError(f"{self.family} needs image_sizes (the (height, width) of each image) next to "
                             f"pixel_values; build inputs with the model's processor")
        n_images = len(image_sizes)
        patching = self.tiling(n_images, batch_num_images)
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
        if kwargs.get("pixel_values_videos") is not None:  # clips (and images next to them): the video mixin
            return self.encode_media(kwargs, needs)
        input_ids = require_input_ids(kwargs)
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both (the model refuses both)")
        if self.runner is not None:  # stage "encoder" (tz.InEncoder): compress inside the vision tower
            return self._encode_in_tower(kwargs, needs)
        pixel_values = kwargs["pixel_values"]
        image_sizes = kwargs.get("image_sizes")
        batch_num_images = self.batch_num_images(kwargs)
        layer, strategy = self._feature_args(kwargs)
        crops, marks, grids = self.plan(pixel_values, image_sizes, batch_num_images, strategy)
        owner = items_per_sample(input_ids, self.image_token_id, [m.shape[0] for m in marks])  # before the tower
        tower = self.core.vision_tower
        cls = has_cls_token(tower)
        probe_needs = frozenset(needs) & ATTENTION_SIGNALS
        # one pass through the tower: the model's own feature path, with the probe recording the signal layer
        with probe(signal_layer(tower, layer), probe_needs, 0 if cls else None) as p:
            feats = self.image_features(pixel_values, image_sizes, layer, strategy, batch_num_images)
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

    def _pack(self, per_crop: torch.Tensor, crops: list[int], image_sizes: Any, aspect: str | None = None
              ) -> list[torch.Tensor]:
        """Per-crop values ``[sum(crops), P, C]`` arranged like the image features by the model's own
        ``pack_image_features`` (crop grid, unpadding, down-scaling), with zeros as the newline markers
        (``aspect``: another ``vision_aspect_ratio`` than the config's, where the model has one)."""
        return self.pack_features(list(torch.split(per_crop, crops, dim=0)), image_sizes,
                                  per_crop.new_zeros(per_crop.shape[-1]), aspect)

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
        if any(item.modality == "video" for item in items):  # clips (and images next to them): the video mixin
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
                                        self.batch_num_images(kwargs), strategy)
            return [int(m.shape[0]) for m in marks], grids

        items = image_llm_items(kwargs, self.image_token_id, plan) + self.video_llm_items(kwargs)  # clips: the mixin
        return sorted(items, key=lambda it: (it.sample, int(it.positions[0])))  # sequence order, images and clips mixed

    def video_llm_items(self, kwargs: dict[str, Any]) -> list:
        """Clips of the call in the LLM sequence: none without a video mixin."""
        return []

    # ---- stage "input" (tokenzip.base.InputCompressor): fewer AnyRes crops (adapters/resample.py) --------------------
    # and, with a video mixin, fewer frames of each video clip ("frames": adapters/pooled_video.py)
    input_reductions: ClassVar[tuple[str, ...]] = ("crops",)
    input_keeps_media = False  # the reduced call carries precomputed features (crops; frames keep pixels)

    def input_plan(self, kwargs: dict[str, Any], reduction: str) -> list:
        if reduction == "frames":
            return self.video_input_plan(kwargs)
        return resample.anyres_input_plan(self, kwargs, reduction)

    def rescale_inputs(self, kwargs: dict[str, Any], reduction: str, items: list, targets: list[int]
                       ) -> tuple[dict[str, Any], list]:
        if reduction == "frames":
            return self.video_rescale_inputs(kwargs, items, targets)
        return resample.anyres_rescale_inputs(self, kwargs, items, targets)

    # ---- stage "encoder" (tz.InEncoder): compression inside the vision tower, see the adapters' docstrings --------
    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        cfg = self.model.config
        cls = has_cls_token(self.core.vision_tower)
        wanted = "default" if cls else "full"  # the features are exactly the patch tokens: [CLS] dropped if present
        if not isinstance(cfg.vision_feature_layer, int) or cfg.vision_feature_select_strategy != wanted:
            raise ValueError(f"{self.family}'s encoder stage needs one integer vision_feature_layer and the "
                             f"{wanted!r} select strategy (the tower {'has' if cls else 'has no'} [CLS] token); this "
                             f"config has {cfg.vision_feature_layer!r} / {cfg.vision_feature_select_strategy!r}")
        if step is None:
            raise ValueError(f"{self.family}'s encoder stage needs the method's budget (the compression step "
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
        per image (see the adapters' module docstrings)."""
        input_ids = kwargs["input_ids"]
        pixel_values = kwargs["pixel_values"]
        image_sizes = kwargs.get("image_sizes")
        layer, strategy = self._feature_args(kwargs)
        cfg = self.model.config
        if (layer, strategy) != (cfg.vision_feature_layer, cfg.vision_feature_select_strategy):
            raise ValueError("the encoder stage was set up for the config's vision_feature_layer/select_strategy; "
                             "a call cannot override them")
        crops, marks, grids = self.plan(pixel_values, image_sizes, self.batch_num_images(kwargs), strategy)
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
        c = self._cls_columns()
        # the first span: every crop in full, as the model runs its tower
        hidden = runner.run(runner.embed(self._crop_pixels(pixel_values, crops)), 0, cuts[0] - 1)
        with probe(runner.span_attention(cuts[0]), needs, 0 if c else None) as p:
            hidden = runner.run(hidden, cuts[0] - 1, cuts[0])
        signals: list[dict[str, torch.Tensor]] = []
        for im, cand in zip(images, candidates):
            cand = cand.to(hidden.device)
            mine = {name: t[im.rows][:, c:] for name, t in p.results.items()}  # patch tokens ([CLS] stays)
            if im.whole:
                im.hidden = hidden[im.rows]
                signals.append(mine)
            else:
                im.cls = hidden[im.rows][:, :c].clone()
                im.state = MergedTokens.start(hidden[im.rows][:, c:].flatten(0, 1)[cand].unsqueeze(0))
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
                tokens = self._pack(im.hidden[:, c:], [im.hidden.shape[0]], sizes)[0][im.keep]
                sig = {name: t[im.keep] for name, t in self._pack_signals(signals[i], [im.hidden.shape[0]],
                                                                          sizes)[0].items()}
                grid = _kept_markers_layout(grids[i], int((marks[i] & im.keep).sum()))
            else:
                tokens, sig = im.state.hidden[0], signals[i]
                grid = cand_grids[i] if len(cuts) == 1 else L.grid(1, tokens.shape[0])
            items.append(Item("image", owner[i], tokens, grid, {**sig, **text[i]},
                              extra={"tokens_in": im.n_llm, "k": im.k if not im.whole else tokens.shape[0]}))
        return items

    def _cls_columns(self) -> int:
        """1 where every crop row of the tower starts with a [CLS] token that is no feature (it rides along
        uncompressed, size 1), else 0 (set_encoder_layer checked the select strategy matches)."""
        return int(has_cls_token(self.core.vision_tower))

    def _tower_rows(self, images: list[_TowerImage]) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple]]:
        """Every image's tokens as tower rows, one per crop (a kept/merged token belongs to the crop of its first
        source; the crop's [CLS] first where the tower has one), padded to the longest row with the key-padding +
        proportional-attention mask; and each row's ``(image, crop, slots)`` (``slots`` None: a whole crop)."""
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
                size = im.state.size[0, slots]
                rows.append(torch.cat([im.cls[c].to(im.state.hidden.dtype), im.state.hidden[0, slots]]))
                sizes.append(torch.cat([size.new_ones(im.cls.shape[1]), size]))
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
        c = self._cls_columns()
        whole_rows: dict[int, list[int]] = {}
        per_row: list[dict[str, torch.Tensor]] = []
        for r, (i, crop, slots) in enumerate(where):
            n = hidden.shape[1] if slots is None else c + slots.numel()
            per_row.append({name: t[0, c:] for name, t in attention_signals(
                runner.span_attention(stop), box["x"][r: r + 1, :n], needs, 0 if c else None,
                k_out=box["k"][r: r + 1, :n]).items()})
            if slots is None:
                whole_rows.setdefault(i, []).append(r)
            else:
                images[i].state.hidden[0, slots] = hidden[r, c:n]
                images[i].cls[crop] = hidden[r, :c]
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
        c = self._cls_columns()
        feats = self.core.multi_modal_projector(hidden[:, c:])  # one call on the rows, as get_image_features does
        image_sizes = kwargs.get("image_sizes")
        out: list[torch.Tensor] = []
        for i, im in enumerate(images):
            rows = [(r, slots) for r, (owner, _, slots) in enumerate(where) if owner == i]
            if im.whole:
                crops = feats[[r for r, _ in rows], : im.hidden.shape[1] - c]
                packed = self.pack_features([crops], image_sizes[i: i + 1], self.core.image_newline)
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
    hidden: torch.Tensor | None = None  # whole: [crops, c + P, D] its crop rows ([CLS] first where the tower has it)
    cls: torch.Tensor | None = None  # compressed: [crops, c, D] each crop's [CLS] (c = 0: none)
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
