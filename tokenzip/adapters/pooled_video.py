"""Video clips of the LLaVA models that pool each frame's patch grid (LLaVA-OneVision: bilinear ``apply_pooling``
and one ``image_newline`` closing the clip; LLaVA-NeXT-Video: the 2x2 ``vision_resampler``, no newline): a mixin for
an adapter of the LLaVA family. Each clip is one item ``[frames(T, g, g), newline(1, 1, 1)?]`` of the features the
model's own ``get_video_features`` gives; the rebuild feeds the compressed clips through ``mm_encoder_outputs["video"]``
(one row ``[1, sum k, D]`` filled row-major over the kept ``<video>`` placeholders: both models flatten it so), the
LLM stage finds each clip's placeholder run, and the input stage ``"frames"`` keeps chosen frames' pixels. What a
model does differently is behind ``video_grid`` (pooled tokens per frame side), ``video_trailing`` (newline tokens
closing a clip) and ``pool_signal_channels`` (how per-patch signals reach the pooled grid). The semantics in detail:
adapters/onevision_video.py and adapters/llava_next_video.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import layout as L
from ..compat import clip_rows
from ..llm.adapter import placeholder_items
from ..output import CompressOutput
from .attention import ATTENTION_SIGNAL_ORDER, ATTENTION_SIGNALS
from .base import InputItem, Item, kept_frames_map
from .placeholders import (
    item_starts,
    items_per_sample,
    multi_keep_mask,
    pad_id_for,
    placeholder_keep_mask,
    require_input_ids,
    shrink_sequences,
    text_signals,
)
from .probe import probe
from .vision import has_cls_token, signal_layer


@dataclass
class ClipFeatures(BaseModelOutputWithPooling):
    """``mm_encoder_outputs["video"]`` after a pre-LLM method: ``pooler_output`` ``[1, sum k, D]``, which the model
    scatters row-major over the kept placeholders, and each clip's kept count ``k`` in ``clip_tokens`` (clips may
    keep different counts; stage "llm" of a ``tz.compose`` pipeline needs the clip boundaries)."""

    clip_tokens: tuple[int, ...] | None = None


class PooledVideo:
    """Mixin: video items of a pooling LLaVA model (module doc). Expects the LLaVA family's ``model``, ``core``,
    ``family``, ``image_token_id``, ``media_token_ids`` and ``_feature_args``; subclasses give ``video_grid``,
    ``video_trailing`` and ``pool_signal_channels``."""

    model: torch.nn.Module
    core: torch.nn.Module
    family: str
    image_token_id: int
    media_token_ids: set[int]
    video_trailing: int = 0  # newline tokens closing each clip (LLaVA-OneVision: 1)

    @property
    def video_token_id(self) -> int:
        vid = getattr(self.model.config, "video_token_id", None)
        if vid is None:
            raise ValueError(f"this {self.family} config has no video_token_id")
        return int(vid)

    def has_media(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None

    def video_grid(self) -> int:
        """Pooled tokens per frame side."""
        raise NotImplementedError

    def pool_signal_channels(self, per_patch: torch.Tensor) -> torch.Tensor:
        """Per-frame signals on the patch grid ``[frames, side * side, C]`` (as channels) to the pooled token grid
        ``[frames, g * g, C]``."""
        raise NotImplementedError

    def video_layout(self, frames: int) -> L.Layout:
        g = self.video_grid()
        newline = [L.Segment("newline", 1, 1, 1)] * self.video_trailing
        return L.Layout([L.Segment("frames", frames, g, g), *newline])

    def check_videos(self, videos: Any) -> tuple[int, int]:
        """``(clips, frames)`` of ``pixel_values_videos``, or a ValueError naming the expected shape."""
        side = self.model.config.vision_config.image_size
        if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[2] != 3 \
                or tuple(videos.shape[-2:]) != (side, side) or videos.shape[1] < 1:
            raise ValueError(f"pixel_values_videos must be a [clips, frames, 3, {side}, {side}] tensor (every clip "
                             f"with the same number of frames), got {tuple(getattr(videos, 'shape', ()))}; build it "
                             f"with tokenzip.video.onevision_video_pixels (sized for the model)")
        return int(videos.shape[0]), int(videos.shape[1])

    # ---- encode -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_media(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        """Image items (the adapter's own image path) and video items, in sequence order."""
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values/pixel_values_videos or mm_encoder_outputs, not both (the model "
                             "refuses both)")
        if getattr(self, "runner", None) is not None:
            raise ValueError(f"{self.family} videos are compressed before the LLM only: stage 'encoder' "
                             "(tz.InEncoder) supports images")
        input_ids = require_input_ids(kwargs)
        images: list[Item] = []
        if kwargs.get("pixel_values") is not None:
            images = self.encode({**kwargs, "pixel_values_videos": None}, needs)  # type: ignore[attr-defined]
        videos = self.encode_videos(kwargs, needs)
        starts = [*self._starts(input_ids, self.image_token_id, images),
                  *self._starts(input_ids, self.video_token_id, videos)]
        order = sorted(range(len(starts)), key=lambda i: starts[i])
        both = images + videos
        return [both[i] for i in order]

    @staticmethod
    def _starts(input_ids: torch.Tensor, token_id: int, items: list[Item]) -> list[tuple[int, int]]:
        pos = item_starts(input_ids, token_id, [it.tokens.shape[0] for it in items], [it.sample for it in items])
        return [(it.sample, p) for it, p in zip(items, pos)]

    def encode_videos(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        input_ids = require_input_ids(kwargs)
        videos = kwargs["pixel_values_videos"]
        clips, frames = self.check_videos(videos)
        layout = self.video_layout(frames)
        n = layout.n
        owner = items_per_sample(input_ids, self.video_token_id, [n] * clips, "video")  # before the tower
        layer, strategy = self._feature_args(kwargs)  # type: ignore[attr-defined]
        tower = self.core.vision_tower
        cls = has_cls_token(tower)
        with probe(signal_layer(tower, layer), frozenset(needs) & ATTENTION_SIGNALS, 0 if cls else None) as p:
            out = self.core.get_video_features(videos, vision_feature_layer=layer,
                                               vision_feature_select_strategy=strategy, return_dict=True)
        feats = clip_rows(out.pooler_output)
        if tuple(feats.shape[:2]) != (clips, n):  # adapter bug, not user input
            raise RuntimeError(f"planned {clips} clips of {n} tokens, the model gave {tuple(feats.shape[:2])}")
        drop = 1 if strategy == "default" else 0
        signals = self._pool_signals({name: t[:, drop:] for name, t in p.results.items()}, clips, frames)
        newline = torch.tensor(layout.newline_mask(), device=feats.device)
        items = []
        for i in range(clips):
            f = feats[i]
            sig = {name: t[i].to(f.device) for name, t in signals.items()}
            if "projected" in needs:
                sig["projected"] = f
            if "text" in needs or "text_mask" in needs:
                sig.update(text_signals(self.core.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                                        self.media_token_ids, owner[i]))
            items.append(Item("video", owner[i], f, layout, sig, extra={"newline": newline, "frames": frames}))
        return items

    def _pool_signals(self, results: dict[str, torch.Tensor], clips: int, frames: int) -> dict[str, torch.Tensor]:
        """The probe's per-frame ``cls_attention`` ``[V*T, P]`` / ``keys`` ``[V*T, P, d]`` pooled to the token grid
        (``pool_signal_channels``, signals as channels), frames concatenated, zero rows for the newline(s):
        ``[V, N]`` / ``[V, N, d]``."""
        names = [name for name in ATTENTION_SIGNAL_ORDER if name in results]
        if not names:
            return {}
        chans = [results[name].float().unsqueeze(-1) if name == "cls_attention" else results[name].float()
                 for name in names]
        pooled = self.pool_signal_channels(torch.cat(chans, dim=-1))  # [V*T, g*g, C]
        pooled = pooled.reshape(clips, -1, pooled.shape[-1])
        pooled = torch.cat([pooled, pooled.new_zeros(clips, self.video_trailing, pooled.shape[-1])], dim=1)
        out, start = {}, 0
        for name, c in zip(names, chans):
            width = c.shape[-1]
            out[name] = pooled[..., start] if name == "cls_attention" else pooled[..., start: start + width]
            start += width
        return out

    # ---- rebuild ------------------------------------------------------------------------------------------------
    def rebuild_media(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]
                      ) -> dict[str, Any]:
        """Shorten every image's and clip's placeholder run to its kept count and feed the compressed features
        through ``mm_encoder_outputs`` (module doc)."""
        input_ids = kwargs["input_ids"]
        b = input_ids.shape[0]
        token = {"image": self.image_token_id, "video": self.video_token_id}
        counts: dict[int, list[list[tuple[int, int]]]] = {t: [[] for _ in range(b)] for t in token.values()}
        for item, out in zip(items, outputs):
            counts[token[item.modality]][item.sample].append((item.tokens.shape[0], out.tokens.shape[1]))
        keep = multi_keep_mask(input_ids, counts)
        new = shrink_sequences(kwargs, keep, pad_id_for(self.model.config, self.media_token_ids))
        for key in ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos", "image_sizes_videos"):
            new.pop(key, None)
        images = [out.tokens[0] for item, out in zip(items, outputs) if item.modality == "image"]
        clips = [out.tokens[0] for item, out in zip(items, outputs) if item.modality == "video"]
        encoded: dict[str, Any] = {}
        if images:
            encoded["image"] = BaseModelOutputWithPooling(pooler_output=tuple(images))
        if clips:  # one row, filled row-major over the placeholders (clips may keep different counts)
            encoded["video"] = ClipFeatures(pooler_output=torch.cat(clips).unsqueeze(0),
                                            clip_tokens=tuple(int(c.shape[0]) for c in clips))
        new["mm_encoder_outputs"] = encoded
        return new

    # ---- stage "llm" --------------------------------------------------------------------------------------------
    def video_llm_items(self, kwargs: dict[str, Any]) -> list:
        """Each clip's ``<video>`` placeholder run in the LLM sequence (module doc), or [] when the call has no
        clips (e.g. a decoding step)."""
        pre = (kwargs.get("mm_encoder_outputs") or {}).get("video")
        if pre is not None:  # after a pre-LLM method: the kept counts, no layout
            sizes = getattr(pre, "clip_tokens", None)
            grids = None
            if sizes is None:  # the model's own form (generate() encodes once): one whole clip per row
                rows = clip_rows(pre.pooler_output)
                sizes = [int(rows.shape[1])] * int(rows.shape[0])
                per_frame = self.video_grid() ** 2
                frames = sizes[0] - self.video_trailing if sizes else 0
                if frames > 0 and frames % per_frame == 0:  # T frames (+ the newline): the layout is known
                    grids = [self.video_layout(frames // per_frame)] * len(sizes)
            sizes = list(sizes)
        elif kwargs.get("pixel_values_videos") is not None:
            clips, frames = self.check_videos(kwargs["pixel_values_videos"])
            layout = self.video_layout(frames)
            sizes, grids = [layout.n] * clips, [layout] * clips
        else:
            return []
        input_ids = require_input_ids(kwargs)
        owners = items_per_sample(input_ids, self.video_token_id, sizes, "video")
        return placeholder_items(input_ids, self.video_token_id, sizes, owners, "video", grids)

    # ---- stage "input", reduction "frames" (module doc) ---------------------------------------------------------
    # the video processor's normalisation (LlavaOnevisionVideoProcessor, LlavaNextVideoVideoProcessor: CLIP mean/std)
    video_pixel_mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    video_pixel_std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)

    def input_keeps_media_for(self, reduction: str) -> bool:
        """Frame selection hands the model fewer frames' pixels (an encoder-stage or pre-LLM method can follow)."""
        return True if reduction == "frames" else bool(self.input_keeps_media)

    def video_rgb(self, clip: torch.Tensor) -> torch.Tensor:
        """One clip's ``pixel_values_videos`` ``[T, 3, S, S]`` back to RGB in ``[0, 1]`` (float32)."""
        mean = torch.tensor(self.video_pixel_mean, dtype=torch.float32, device=clip.device)[:, None, None]
        std = torch.tensor(self.video_pixel_std, dtype=torch.float32, device=clip.device)[:, None, None]
        return (clip.float() * std + mean).clamp_(0.0, 1.0)

    def video_input_plan(self, kwargs: dict[str, Any]) -> list[InputItem]:
        """Each clip of the call with the counts of ``1 .. T`` kept frames and its frames as RGB (module doc)."""
        input_ids = require_input_ids(kwargs)
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values/pixel_values_videos or mm_encoder_outputs, not both (the model "
                             "refuses both)")
        videos = kwargs.get("pixel_values_videos")
        if videos is None:
            return []
        clips, frames = self.check_videos(videos)
        layout = self.video_layout(frames)
        per_frame = self.video_grid() ** 2
        owner = items_per_sample(input_ids, self.video_token_id, [layout.n] * clips, "video")
        achievable = tuple(j * per_frame + self.video_trailing for j in range(1, frames + 1))
        return [InputItem("video", owner[i], layout.n, achievable, layout,
                          extra={"frames": self.video_rgb(videos[i]), "clip": i}) for i in range(clips)]

    @torch.no_grad()
    def video_rescale_inputs(self, kwargs: dict[str, Any], items: list[InputItem], targets: list[int]
                             ) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The call with only each clip's kept frames (``InputItem.keep``) and its placeholders shortened to match
        (module doc); per clip the ``(source, index)`` map of kept tokens to the original ones."""
        videos = kwargs["pixel_values_videos"]
        _, frames = self.check_videos(videos)
        per_frame = self.video_grid() ** 2
        kept: list[torch.Tensor] = []
        for it, count in zip(items, targets):
            keep = it.keep if it.keep is not None else torch.arange(frames)
            keep = torch.as_tensor(keep, dtype=torch.long).cpu()
            if count != keep.numel() * per_frame + self.video_trailing:
                raise ValueError(f"clip {it.extra['clip']}: {count} tokens need "
                                 f"{(count - self.video_trailing) / per_frame:g} frames of {per_frame} tokens + "
                                 f"{self.video_trailing} newline(s), but InputItem.keep holds {keep.numel()} "
                                 f"frames (reduction 'frames' needs the choice of a tokenzip.base.FrameSelector)")
            kept.append(keep)
        counts = sorted({int(k.numel()) for k in kept})
        if len(counts) > 1:
            raise ValueError(f"{self.family} takes one pixel_values_videos tensor [clips, frames, 3, S, S]: every "
                             f"clip of a call must keep the same number of frames, got {counts} frames across its clips"
                             f" (give every clip the same budget, or call the model once per clip)")
        new_videos = torch.stack([videos[it.extra["clip"], k.to(videos.device)] for it, k in zip(items, kept)])
        input_ids = kwargs["input_ids"]
        per_sample: list[list[tuple[int, int]]] = [[] for _ in range(input_ids.shape[0])]
        maps = []
        for it, count, keep in zip(items, targets, kept):
            per_sample[it.sample].append((it.tokens, count))
            maps.append(kept_frames_map(frames, per_frame, keep, trailing=self.video_trailing))  # + newline
        keep_mask = placeholder_keep_mask(input_ids, self.video_token_id, per_sample)
        new = shrink_sequences(kwargs, keep_mask, pad_id_for(self.model.config, self.media_token_ids))
        new["pixel_values_videos"] = new_videos
        return new, maps
