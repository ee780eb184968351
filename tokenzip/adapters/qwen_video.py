"""Qwen2-VL / Qwen2.5-VL video items: what :class:`~tokenzip.adapters.qwen2_vl.Qwen2VLAdapter` adds for
``pixel_values_videos`` + ``video_grid_thw`` (a mixin; the shared image/video machinery stays in ``qwen2_vl.py``).

The ViT treats a clip exactly like an image whose grid has ``t > 1`` temporal grids: ``pixel_values_videos`` are the
flattened patches ``[sum t*h*w, C * temporal_patch_size * p * p]`` (``temporal_patch_size = 2`` frames per patch; the
processor repeats the last frame of an odd-length clip), full attention runs per temporal grid (``cu_seqlens``),
Qwen2.5-VL's windows per temporal grid too, and the merger gives ``t * (h/2) * (w/2)`` LLM tokens in the order
``(t, h/2, w/2)``, scattered over the clip's ``<|video_pad|>`` placeholders. So a clip is one item of modality
``"video"``:

* **Tokens**: the clip's slice of the model's own ``get_video_features`` output (merger output, LLM space).
  **Layout**: ``frames(t, h/2, w/2)``: a "frame" for frame-based methods is one temporal grid (2 input frames).
* **Signals** as for images (same probe on the last vision block, same 2x2 averaging and window-order undo), with
  ``cls_attention`` the mean over the patch queries of the token's own temporal grid (the queries a full-attention
  block lets attend to it), so every temporal grid is normalised alike; ``keys``; ``text``/``text_mask``.
* **Positions**: every kept token keeps exactly the column of the M-RoPE position ids the installed model's
  ``get_rope_index`` gives the FULL sequence (``second_per_grid_ts`` passed through on Qwen2.5-VL, where the temporal
  index is ``floor(grid * tokens_per_second * second_per_grid_ts)``); the text after a clip keeps its own. Nothing is
  re-derived: a merged token takes its representative's column (``CompressOutput.index``).
* **Rebuild**: each clip keeps its first ``k`` placeholders; ``mm_encoder_outputs["video"]`` carries one tensor per
  clip (the model concatenates them), next to ``mm_encoder_outputs["image"]``; ``video_grid_thw`` and
  ``second_per_grid_ts`` leave the call (positions are explicit).
* **Batches**: clips of different lengths (different ``t``) and sizes in one call, any number per sample, images
  and clips mixed in a prompt; items come in sequence order (sample, then position).

Stage "llm" (tokenzip/llm): each clip's run of ``<|video_pad|>`` placeholders is one item with the layout above
(after a pre-LLM method in ``tz.compose``: the kept counts, no layout). A method without ``"video"`` in its
``info.modalities`` leaves the clips whole (tokenzip/patch.py).

Stage "encoder" (``tz.InEncoder``): the merge-unit design of ``qwen2_vl.py`` applies per temporal grid unchanged
(units keep their frame, window and rotary positions), so a clip is compressed inside the ViT like a multi-frame
image, with its own ViT pass (``get_video_features`` is a separate pass in the model too) and ``cls_attention``
normalised per temporal grid over the units that are left. A schedule of several cuts is supported for images only
(the adapter cannot tell which modalities the step at the earlier cuts compresses): a schedule with clips in the
call is a ValueError.

Stage "input", reduction ``"frames"`` (``tokenzip.base.FrameSelector``: frame selection BEFORE the vision encoder;
the plan and the kept rows are :mod:`tokenzip.adapters.temporal_grids`, shared with Qwen3-VL). The unit is one
temporal grid (``temporal_patch_size`` frames share a patch, so no smaller unit exists):
``video_input_plan`` gives one item per clip with ``N = t * (h/2) * (w/2)``, achievable counts
``j * (h/2) * (w/2)`` for ``j = 1 .. t`` kept grids, and ``extra["frames"]``: the first frame of each grid as RGB in
``[0, 1]`` (the call's patches put back into frames and un-normalised with the video processor's mean/std,
``video_pixel_mean``/``video_pixel_std``: the CLIP values of ``Qwen2VLVideoProcessor``). ``video_rescale_inputs``
keeps each clip's chosen grids (``InputItem.keep``): their patch rows of ``pixel_values_videos`` (a grid's patches
are contiguous), ``video_grid_thw`` with the kept count, and exactly the kept grids' ``<|video_pad|>`` columns of
the prompt (:func:`~tokenzip.adapters.temporal_grids.gathered_frames_call`, shared with the Omni adapters). The
ViT attends within a temporal grid (and its windows) and a patch's rotary position does not depend on its grid, so
a kept grid's tokens are the tokens the full clip gives it; and every kept column keeps the M-RoPE position the full
sequence gives it (explicit ``position_ids`` gathered from ``get_rope_index`` of the uncompressed
call, ``second_per_grid_ts`` included), so a kept grid keeps its place in time and the text after the clip its
position. The call still carries pixels: an encoder-stage or pre-LLM method can follow in ``tz.compose``, and it
keeps these positions (``position_ids`` are the caller's to it). Clips may keep different counts; images pass
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .. import layout as L
from ..llm.adapter import placeholder_items
from . import temporal_grids as TG
from .base import InputItem, Item
from .placeholders import (
    check_grid,
    item_starts,
    items_per_sample,
    pad_id_for,
    require_input_ids,
)
from .resample import qwen_patch_spec


@dataclass(frozen=True)
class Media:
    """Where one modality's inputs live in a Qwen-VL call."""

    modality: str
    pixels: str  # the flattened patches
    grid: str  # their [n, 3] (t, h, w) patch grids


IMAGE = Media("image", "pixel_values", "image_grid_thw")
VIDEO = Media("video", "pixel_values_videos", "video_grid_thw")
MEDIA = (IMAGE, VIDEO)


def qwen_layout(modality: str, t: int, h: int, w: int, merge: int) -> L.Layout:
    """The layout of the merger's output for a ``t x h x w`` patch grid (``merge x merge`` patches per token): a clip
    is ``frames(t, h/merge, w/merge)`` (also a one-grid clip); an image one grid (``t`` grids of frames when
    ``t > 1``). The HF adapters and the vLLM models (tokenzip/vllm) lay items out with this one function."""
    if modality == "video":
        return L.frames(t, h // merge, w // merge)
    return L.Layout([L.Segment("image" if t == 1 else "frames", t, h // merge, w // merge)])


class QwenVideo:
    """Mixin: Qwen-VL video items (module doc). Expects ``model``, ``core``, ``merge``, ``image_token_id``,
    ``video_token_id`` and the adapter's ``_layout``."""

    model: torch.nn.Module
    core: torch.nn.Module
    merge: int
    image_token_id: int
    video_token_id: int

    def has_media(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None

    def media_in(self, kwargs: dict[str, Any]) -> list[Media]:
        """The modalities whose pixels this call carries."""
        return [m for m in MEDIA if kwargs.get(m.pixels) is not None]

    def token_of(self, modality: str) -> int:
        return self.image_token_id if modality == "image" else self.video_token_id

    def media_grid(self, kwargs: dict[str, Any], media: Media) -> torch.Tensor:
        """The validated ``[n, 3]`` patch grids of one modality."""
        return check_grid(kwargs.get(media.grid), media.grid, media.pixels, media.modality, self.merge,
                          "Qwen-VL models", "videos: tokenzip.video.qwen_video_inputs")

    def media_layout(self, modality: str, t: int, h: int, w: int) -> L.Layout:
        """A clip is always ``frames(t, h/2, w/2)`` (also a one-grid clip); an image as the adapter lays it out."""
        if modality == "video":
            return qwen_layout("video", t, h, w, self.merge)  # type: ignore[attr-defined]
        return self._layout(t, h, w)  # type: ignore[attr-defined]

    def media_features(self, media: Media, pixels: torch.Tensor, grid: torch.Tensor) -> Any:
        """The model's own feature path of the modality (one ViT pass)."""
        get = self.core.get_image_features if media is IMAGE else self.core.get_video_features
        return get(pixels, grid.to(pixels.device), return_dict=True)

    @staticmethod
    def queries_per_token(media: Media, grid: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """``[sum sizes]`` the patch queries ``cls_attention`` is averaged over, per merged token: all of an image's
        patches; the patches of a clip token's temporal grid (module doc)."""
        per_item = grid.prod(-1) if media is IMAGE else grid[:, 1] * grid[:, 2]
        return per_item.cpu().repeat_interleave(torch.tensor(sizes))

    def check_second_per_grid(self, kwargs: dict[str, Any]) -> None:
        """``second_per_grid_ts`` (Qwen2.5-VL): one value per clip, or a clear error (the model's iterator would run
        dry or silently use the wrong clip's value)."""
        spg = kwargs.get("second_per_grid_ts")
        if spg is None or kwargs.get("video_grid_thw") is None:
            return
        n = len(torch.as_tensor(kwargs["video_grid_thw"]))
        values = torch.as_tensor(spg).flatten()
        if values.numel() != n or not bool(torch.isfinite(values).all()) or bool((values <= 0).any()):
            raise ValueError(f"second_per_grid_ts must hold one finite value > 0 per clip ({n} in video_grid_thw), "
                             f"got {values.tolist()}")

    def in_sequence_order(self, input_ids: torch.Tensor, items: list[Item]) -> list[Item]:
        """Images and clips of one call sorted by (sample, first placeholder)."""
        keys = []
        for modality in ("image", "video"):
            group = [it for it in items if it.modality == modality]
            starts = item_starts(input_ids, self.token_of(modality), [it.tokens_in for it in group],
                                 [it.sample for it in group])
            keys += [(it.sample, s) for it, s in zip(group, starts)]
        ordered = [it for it in items if it.modality == "image"] + [it for it in items if it.modality == "video"]
        return [it for _, it in sorted(zip(keys, ordered), key=lambda p: p[0])]

    # ---- stage "llm" --------------------------------------------------------------------------------------------
    def video_llm_items(self, kwargs: dict[str, Any]) -> list:
        """Each clip's ``<|video_pad|>`` run in the LLM sequence (module doc), or [] when the call has no clips."""
        pre = (kwargs.get("mm_encoder_outputs") or {}).get("video")
        grids = None
        if pre is not None:
            rows = pre.pooler_output
            if isinstance(rows, torch.Tensor):  # one [sum N, D] tensor: the clip boundaries come from the grids
                if kwargs.get("video_grid_thw") is None:
                    raise ValueError("mm_encoder_outputs['video'].pooler_output must be a tuple of per-clip tensors "
                                     "(as get_video_features returns) or come with video_grid_thw")
                sizes = [int(n) // self.merge ** 2 for n in self.media_grid(kwargs, VIDEO).prod(-1).tolist()]
            else:
                sizes = [int(t.shape[0]) for t in rows]
            grid = kwargs.get("video_grid_thw")
            if grid is not None:  # the model's own features with their grids: the layout is known
                grid = self.media_grid(kwargs, VIDEO)
                planned = [int(t * h * w) // self.merge ** 2 for t, h, w in grid.tolist()]
                if planned == sizes:
                    grids = [self.media_layout("video", *g) for g in grid.tolist()]
        elif kwargs.get("pixel_values_videos") is not None:
            grid = self.media_grid(kwargs, VIDEO)
            sizes = [int(t * h * w) // self.merge ** 2 for t, h, w in grid.tolist()]
            grids = [self.media_layout("video", *g) for g in grid.tolist()]
        else:
            return []
        input_ids = require_input_ids(kwargs)
        owners = items_per_sample(input_ids, self.video_token_id, sizes, "video")
        return placeholder_items(input_ids, self.video_token_id, sizes, owners, "video", grids)

    # ---- stage "input", reduction "frames" (module doc) ---------------------------------------------------------
    # the video processor's normalisation (Qwen2VLVideoProcessor: CLIP mean/std, rescale 1/255)
    video_pixel_mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    video_pixel_std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)

    def video_input_plan(self, kwargs: dict[str, Any]) -> list[InputItem]:
        """Each clip with the counts of ``1 .. t`` kept temporal grids and one RGB frame per grid (module doc)."""
        input_ids = require_input_ids(kwargs)
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values/pixel_values_videos or mm_encoder_outputs, not both (the model "
                             "refuses both)")
        if kwargs.get("pixel_values_videos") is None:
            return []
        grid = self.media_grid(kwargs, VIDEO)
        return TG.frames_plan(input_ids, TG.clip_rows(kwargs["pixel_values_videos"], grid), grid, self.video_token_id,
                              qwen_patch_spec(self), self.video_pixel_mean, self.video_pixel_std,
                              lambda t, h, w: self.media_layout("video", t, h, w))

    @torch.no_grad()
    def video_rescale_inputs(self, kwargs: dict[str, Any], items: list[InputItem], targets: list[int]
                             ) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The call with only each clip's kept temporal grids, their placeholder columns and their full-sequence
        positions (module doc); per clip the ``(source, index)`` map of kept tokens to the original ones."""
        return TG.gathered_frames_call(self, kwargs, items, targets, self.media_grid(kwargs, VIDEO),
                                       pad_id_for(self.model.config, {self.image_token_id, self.video_token_id}))
