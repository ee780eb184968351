"""Qwen2.5-Omni (``Qwen2_5OmniThinkerForConditionalGeneration``; ``Qwen2_5OmniForConditionalGeneration`` through its
``thinker`` when it generates text).

The thinker reads three kinds of media: audio (a Whisper-like encoder over 128-bin log-mel frames: conv stem, chunked
window attention of ``n_window`` frames, ``AvgPool1d(2)``, a projection into the LLM's space: one token per 4 mel
frames, **25 tokens per second**), images and videos (the Qwen2.5-VL ViT with window attention and a 2x2 patch
merger). Positions are TMRoPE: 3-D ``(t, h, w)`` ids from the model's own ``get_rope_index``, where one unit of ``t``
is ``1 / position_id_per_seconds`` seconds (25 per second in the checkpoints) for audio tokens and video grids alike.
With ``use_audio_in_video=True`` a video and its own soundtrack share one block of the prompt,
``<vision_bos><audio_bos> [video chunk 0][audio chunk 0][video chunk 1][audio chunk 1] ... <audio_eos><vision_eos>``,
cut into ``seconds_per_chunk`` (2 s) chunks by time; both bos markers share one position, both eos markers another.

Items (sequence order: sample, then first placeholder). Every image, video and audio clip is its own item, also when
a video's soundtrack is interleaved with it: an audio method compresses the audio stream, a video method the video
stream, each on its own time axis.

* **audio** (``input_features`` ``[clips, mel, frames]`` + ``feature_attention_mask``, clips in placeholder order
  over the batch, as the model's ``masked_scatter`` fills them): the tokens of ``model.get_audio_features`` (already
  in the LLM's space), layout ``audio(n)`` with ``n = ((L - 1) // 2 + 1 - 2) // 2 + 1`` for ``L`` valid mel frames.
* **image** (``pixel_values`` + ``image_grid_thw``) and **video** (``pixel_values_videos`` + ``video_grid_thw`` +
  ``video_second_per_grid``): the merger's output of ``get_image_features`` / ``get_video_features`` (raster order, as
  the model restores it), layout ``image(h/2, w/2)`` / ``frames(t, h/2, w/2)``; one video "frame" is one temporal grid
  (``temporal_patch_size`` = 2 frames, ``video_second_per_grid`` seconds).

``Item.extra`` (the conventions joint audio-video methods build on):

* ``slots``: ``LongTensor [N]``, the item's placeholder columns in its sample's row of ``input_ids`` (ascending);
* ``positions``: ``LongTensor [3, N]``, the TMRoPE ``(t, h, w)`` ids the FULL sequence gives each token;
* ``seconds``: ``FloatTensor [N]``, each token's time from the item's start, ``(t - t[0]) / position_id_per_seconds``
  (audio: 0.04 s steps; video: the grid's start), so an audio token and a video grid at the same second line up;
* ``chunk``: ``LongTensor [N]``, the ``seconds_per_chunk`` window each token falls in (the model's own
  ``get_chunked_index`` on the t ids, the windows the prompt interleaves by when ``use_audio_in_video``);
* ``partner``: with ``use_audio_in_video``, the index (in the returned item list) of the video's soundtrack item on a
  video item and of its video on that audio item; absent otherwise;
* ``frames`` (video: temporal grids), ``second_per_grid`` (video), ``mel_frames`` (audio: valid mel frames).

Signals.

* audio ``cls_attention`` (the name every audio method reads): the attention each encoder frame receives in the audio
  encoder's LAST layer, recomputed from that layer's own q/k on the clip's frames as ONE FULL sequence (OmniZip's
  score; the model itself attends within ``n_window`` windows there), mean over heads and over all the clip's frames
  as queries, no eager attention; then the two frames each pooled token averages are summed (as on Qwen2-Audio: the
  pair's mean up to the factor 2, which no ranking sees, and the clip's scores still sum to <= 1). ``keys``: that
  layer's keys (mean over heads), averaged over the pair. ``speech``: Silero VAD per 40 ms token when the call passes
  the clips' 16 kHz waveforms as ``raw_audio=[wave, ...]`` (one per audio clip, a tokenzip-only keyword), else the
  log-mel energy score (:mod:`tokenzip.adapters.speech`).
* image / video ``cls_attention``: the attention each patch receives in the ViT's last block, recomputed from the
  block's own ``q``/``k`` projections and rotary embedding on the block's own segments (windows when the last block
  is windowed; frames when it is a full-attention block: the checkpoints), mean over heads; the four patches of a
  merge group are averaged, and each token's score is divided by the patches of its image / its frame (the mean over
  the queries that can see it). ``keys``: that block's keys before rotary (mean over heads, mean over the group).
* ``projected``: the tokens themselves (already in the LLM's space); ``text`` / ``text_mask``: the prompt's text
  embeddings (media placeholders and padding excluded).

Rebuild. The thinker has no precomputed-features argument for audio (``mm_encoder_outputs`` covers images and videos
only), so the adapter passes ``inputs_embeds``: the text embeddings of the shortened prompt with each item's
compressed tokens written at its kept slots. **A kept token keeps its own slot**: the output of a method is put in
the order of its representative input tokens (``CompressOutput.index``: the kept token, or a merged group's first
member) and sits at that token's placeholder, so the interleaved audio/video chunks stay in their time order and
the causal order between the two streams is the uncompressed one. **Positions**: the full ``[3, B, L]`` TMRoPE ids
come from the installed model's own ``get_rope_index`` on the uncompressed call (with ``use_audio_in_video``,
``video_second_per_grid`` and the audio lengths; or the caller's ``position_ids``) and the kept columns are gathered
- never re-derived - so every kept token, every text token and the shared bos/eos markers keep their exact
uncompressed positions. They are passed as ``[4, B, L']`` ``position_ids`` (row 0: contiguous text positions for the
causal mask), the format ``generate()`` builds and extends by ``last + 1`` per step; ``model.model.rope_deltas`` is
set to ``max position + 1 - kept length`` per sample (the model's definition) for decoding without position ids.
``input_ids`` (shortened) stays in the call for ``generate()``'s running sequence; media tensors, grids, audio
lengths, ``video_second_per_grid`` and ``use_audio_in_video`` are dropped (positions are explicit).

The full model (``Qwen2_5OmniForConditionalGeneration``): the adapter works on its ``thinker`` (``parts()`` are the
thinker's); a patched ``model.generate(..., generation_mode="text")`` hands the rebuilt arguments to
``thinker.generate`` (the model passes unprefixed arguments on to it). Speech output (the talker) is not compressed.

Stage "llm" (LLMAccess): each item's placeholder columns in the sequence (not contiguous for interleaved streams);
after a pre-LLM method (``tz.compose``), the kept columns this adapter's ``rebuild`` recorded for THIS call's
shortened prompt, taken first (the rebuilt call carries no audio features, and Qwen3-Omni's carries its visual
tokens as ``mm_encoder_outputs``: items planned from its arguments would lose the audio), dropped in ``release()``.

Stage "input", reduction ``"frames"`` (``tokenzip.base.FrameSelector``, video clips; images and audio pass whole):
the unit is one temporal grid. :mod:`tokenzip.adapters.temporal_grids` makes the plan (one item per clip, one RGB
frame per grid, un-normalised with the video processor's mean/std) and the call
(:func:`~tokenzip.adapters.temporal_grids.gathered_frames_call`, as for Qwen2-VL): the kept grids' patch rows and
``video_grid_thw``, the prompt less the dropped grids' video placeholders (a soundtrack interleaved with the clip
stays whole, as do the markers), and every kept column at the position the FULL call's ``get_rope_index`` gives it
(explicit ``[4, B, L']`` ``position_ids``, ``rope_deltas`` set): TMRoPE carries time in the temporal index, so the
positions of the shortened prompt are never re-derived. The call keeps its media, so a pre-LLM or LLM-stage method
can follow in ``tz.compose``.

Stage "encoder" (audio tower; ``tz.InEncoder(method, layer=L)`` or a schedule of cuts; the cuts count the audio
tower's layers, ``encoder_depth()``): :mod:`tokenzip.adapters.omni_audio_tower`. The model's own audio pass
(``get_audio_features``) is stopped after layer ``L - 1``; the unit the method compresses is one pooled pair of
encoder frames (the model's ``get_pool_indices``: one LLM token), per clip ``[n, 2 * D]`` (the pair's two frame states
concatenated) with layout ``audio(n)``, ``n`` the clip's LLM tokens, so the budget is counted in LLM tokens exactly as
at stage ``pre_llm``; a kept unit keeps both frames, merged units are averaged frame by frame (size-weighted). A
clip's last frame when its frame count is odd is in no pair: the model's pooling never reads it, but its window-mates
attend to it, so it is carried along uncompressed (retain=1.0 is exact, down to the audio tokens). Layers ``L`` ...
last are the model's own layer modules on the frames left, each frame in its ORIGINAL attention window (``cu_seqlens``
recomputed per window from the frames left; a merged unit in its representative's, its first member's, windows); the
audio attention takes no mask, so there is no proportional attention (a merged unit is a plain average there, as on
the Qwen-VL ViTs). Then the model's pair mean, ``ln_post`` and ``proj`` on every kept unit of the call at once, and
``rebuild`` writes each token at its representative unit's placeholder, as at stage ``pre_llm`` (after a schedule's
earlier cuts an item's ``slots`` / ``positions`` / ``seconds`` / ``chunk`` are those of the units left, at their
representatives). Signals at the cut come from layer ``L - 1``: ``cls_attention`` / ``keys`` as at the tower's output
(that layer's q/k over each clip's frames left as one full sequence, per pair summed / averaged), ``speech`` (per
original unit; after an earlier cut of a schedule the mean over the units a unit stands for), ``text`` /
``text_mask``; not ``projected`` (``proj`` has not run). Images and videos of the same call are not cut inside the
ViT: the method compresses them at the vision tower's output, as at stage ``pre_llm``, or passes them whole when it
does not take their modality (and an audio clip passes whole through the tower when the method does not take audio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.vision_utils import get_vision_window_index

from .. import layout as L
from ..callstate import per_call
from ..compat import cache_from, omni_thinker_parts
from ..llm.adapter import LLMAccess
from ..llm.hooks import LLMItem
from ..output import CompressOutput
from . import positions as P
from . import temporal_grids as TG
from .attention import ATTENTION_SIGNALS
from .base import Adapter, InputItem, Item, ModelParts
from .omni_audio_tower import AudioTowerStage, unit_signals
from .placeholders import (
    check_grid,
    items_per_sample,
    pad_id_for,
    padding_side,
    require_input_ids,
    shrink_sequences,
    text_signals,
)
from .qwen2_vl import _LastBlockProbe
from .resample import qwen_patch_spec
from .speech import RAW_AUDIO, clip_frames, energy_speech, raw_waveforms, silero_speech

MEL_PER_TOKEN = 4  # conv2 stride 2 x average pooling stride 2
SAMPLES_PER_TOKEN = 640  # 4 mel frames x hop 160 at 16 kHz: 40 ms per audio token
_MEDIA_KEYS = ("input_features", "feature_attention_mask", "audio_feature_lengths", "pixel_values",
               "pixel_values_videos", "image_grid_thw", "video_grid_thw", "video_second_per_grid",
               "use_audio_in_video", "mm_encoder_outputs", "inputs_embeds", RAW_AUDIO)


@dataclass
class _Plan:
    """One call's media, before any encoder runs: per item its modality, sample, placeholder columns and layout."""

    modality: str
    sample: int
    slots: torch.Tensor
    layout: L.Layout | None  # None: features precomputed by generate(), no grid in the call
    source: int  # index among the call's items of that modality (clip / image / video number)


class Qwen2_5OmniAdapter(AudioTowerStage, LLMAccess, Adapter):
    model_classes = ("Qwen2_5OmniThinkerForConditionalGeneration", "Qwen2_5OmniForConditionalGeneration")
    modalities = ("image", "video", "audio")
    # per-call state, per thread (tokenzip/callstate.py)
    _short = per_call()
    stages = ("pre_llm", "encoder", "llm")
    signals = frozenset({"cls_attention", "keys", "projected", "text", "text_mask", "speech"})
    # whether rebuild writes image/video tokens into inputs_embeds (Qwen3-Omni: they go through mm_encoder_outputs)
    visual_in_embeds = True

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        # the full model generates text with its thinker; everything compressible lives there
        self.thinker = getattr(model, "thinker", model)
        self.core, self.text_model = omni_thinker_parts(self.thinker)
        cfg = self.thinker.config
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)
        self.audio_token_id = int(cfg.audio_token_id)
        self.merge = int(cfg.vision_config.spatial_merge_size)
        self.position_id_per_seconds = float(cfg.position_id_per_seconds)
        self.seconds_per_chunk = float(getattr(cfg, "seconds_per_chunk", 2.0))  # Qwen3-Omni: its processor's 2 s
        self.token = {"image": self.image_token_id, "video": self.video_token_id, "audio": self.audio_token_id}
        self._short: tuple[torch.Tensor, list[LLMItem]] | None = None  # the last rebuild's prompt, for stage "llm"

    # ---- queries ------------------------------------------------------------------------------------------------
    def parts(self) -> ModelParts:
        lm = self.text_model
        visual = self.core.visual  # the audio encoder is ``self.core.audio_tower``
        return ModelParts(encoder=visual, encoder_layers=visual.blocks, projector=visual.merger, language_model=lm,
                          decoder_layers=lm.layers, final_norm=lm.norm, embed=self.core.get_input_embeddings(),
                          media_token_ids=dict(self.token))

    def has_media(self, kwargs: dict[str, Any]) -> bool:
        return any(kwargs.get(k) is not None for k in ("input_features", "pixel_values", "pixel_values_videos"))

    def _has_items(self, kwargs: dict[str, Any]) -> bool:
        """Media in the call, also as the image/video features ``generate()`` computes once before prefill."""
        return self.has_media(kwargs) or any(v is not None for v in (kwargs.get("mm_encoder_outputs") or {}).values())

    def batch_size(self, kwargs: dict[str, Any]) -> int:
        return require_input_ids(kwargs).shape[0]

    # ---- per-call bookkeeping -------------------------------------------------------------------------------------
    def _audio_args(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        feats = kwargs.get("input_features")
        if feats is None:
            return None
        if not isinstance(feats, torch.Tensor) or feats.dim() != 3:
            raise ValueError(f"input_features must be a [clips, mel, frames] tensor, got "
                             f"{getattr(feats, 'shape', type(feats))}")
        fmask = kwargs.get("feature_attention_mask")
        if fmask is None:
            raise ValueError("Qwen2.5-Omni needs feature_attention_mask with input_features (the processor returns "
                             "it) to know each clip's length")
        if tuple(fmask.shape) != (feats.shape[0], feats.shape[-1]):
            raise ValueError(f"feature_attention_mask must be [clips, frames] = {(feats.shape[0], feats.shape[-1])}, "
                             f"got {tuple(fmask.shape)}")
        return feats, fmask

    def _grid(self, kwargs: dict[str, Any], key: str, pixels: str) -> torch.Tensor | None:
        if kwargs.get(pixels) is None:
            return None
        modality = "image" if key == "image_grid_thw" else "video"
        return check_grid(kwargs.get(key), key, pixels, modality, self.merge, "Qwen-Omni models",
                          "or tokenzip.av.omni_av_inputs")

    def _video_seconds(self, kwargs: dict[str, Any], videos: int) -> torch.Tensor:
        spg = kwargs.get("video_second_per_grid")
        if spg is None:
            raise ValueError("video_second_per_grid is required with pixel_values_videos (seconds per temporal grid: "
                             "temporal_patch_size / fps; the processor returns it)")
        spg = torch.as_tensor(spg, dtype=torch.float32).flatten()
        if spg.numel() != videos or not bool((spg > 0).all()):
            raise ValueError(f"video_second_per_grid must hold one positive number per video ({videos}), got "
                             f"{spg.tolist()}")
        return spg

    def _plan(self, kwargs: dict[str, Any]) -> list[_Plan]:
        """Every item of the call in sequence order, from the grids and audio lengths (no encoder runs)."""
        input_ids = require_input_ids(kwargs)
        per_modality: list[tuple[str, list[int], list[L.Layout | None]]] = []
        audio = self._audio_args(kwargs)
        if audio is not None:
            sizes = [int(n) for n in self._audio_token_counts(audio[1].sum(-1).long()).tolist()]
            per_modality.append(("audio", sizes, [L.audio(n) for n in sizes]))
        encoded = kwargs.get("mm_encoder_outputs") or {}
        for modality, key, pixels in (("image", "image_grid_thw", "pixel_values"),
                                      ("video", "video_grid_thw", "pixel_values_videos")):
            grid = self._grid(kwargs, key, pixels)
            if grid is None:
                if encoded.get(modality) is not None:  # generate() encodes images/videos once, before prefill
                    sizes = [int(t.shape[0]) for t in encoded[modality].pooler_output]
                    per_modality.append((modality, sizes, [None] * len(sizes)))
                continue
            if modality == "video":
                self._video_seconds(kwargs, grid.shape[0])
            m = self.merge
            sizes = [int(t * h * w) // (m * m) for t, h, w in grid.tolist()]
            layouts = [L.grid(h // m, w // m) if modality == "image" and t == 1 else L.frames(t, h // m, w // m)
                       for t, h, w in grid.tolist()]
            per_modality.append((modality, sizes, layouts))
        plans: list[_Plan] = []
        for modality, sizes, layouts in per_modality:
            token = self.token[modality]
            what = {"audio": "audio clip"}.get(modality, modality)
            owners = items_per_sample(input_ids, token, sizes, what)
            where = [(input_ids[b] == token).nonzero().flatten() for b in range(input_ids.shape[0])]
            cursor = [0] * input_ids.shape[0]
            for j, (n, b, layout) in enumerate(zip(sizes, owners, layouts)):
                plans.append(_Plan(modality, b, where[b][cursor[b]: cursor[b] + n], layout, j))
                cursor[b] += n
        plans.sort(key=lambda p: (p.sample, int(p.slots[0])))
        return plans

    def _audio_token_counts(self, mel_frames: torch.Tensor) -> torch.Tensor:
        """LLM tokens of clips of ``mel_frames`` valid log-mel frames (the model's own length function)."""
        return self.core.audio_tower._get_feat_extract_output_lengths(mel_frames)[1]

    def _original_positions(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """``[P, B, L]`` position ids of the uncompressed call: the caller's (P = 1, 3 or 4), or ``[4, B, L]`` from
        the installed model's own ``get_rope_index`` (row 0: the text positions ``generate()`` prepends)."""
        input_ids = kwargs["input_ids"]
        if (given := P.caller_positions(kwargs, input_ids)) is not None:
            return given
        mask = kwargs.get("attention_mask")
        real = torch.ones_like(input_ids) if mask is None else mask
        audio = self._audio_args(kwargs)
        videos = kwargs.get("video_grid_thw") if kwargs.get("pixel_values_videos") is not None else None
        rope, _ = self.core.get_rope_index(
            input_ids, image_grid_thw=kwargs.get("image_grid_thw") if kwargs.get("pixel_values") is not None
            else None, video_grid_thw=videos, attention_mask=real,
            use_audio_in_video=bool(kwargs.get("use_audio_in_video")),
            audio_seqlens=None if audio is None else audio[1].sum(-1),
            second_per_grids=None if videos is None else self._video_seconds(kwargs, len(videos)))
        return torch.cat([P.text_row(real, rope.dtype).unsqueeze(0), rope], dim=0)

    def _chunks(self, t: torch.Tensor) -> torch.Tensor:
        """The ``seconds_per_chunk`` window of each t id (``t`` ascending), by the model's own ``get_chunked_index``."""
        per_chunk = int(self.position_id_per_seconds * self.seconds_per_chunk)
        out = torch.zeros(t.shape[0], dtype=torch.long)
        for c, (s, e) in enumerate(self.core.get_chunked_index(t.cpu(), per_chunk, int(t[0]))):
            out[s:e] = c
        return out

    # ---- encode -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        input_ids = require_input_ids(kwargs)
        cache = cache_from(kwargs)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise ValueError("tokenzip compresses media at prefill only: media came with a non-empty cache (a "
                             "continued conversation); start from an empty cache")
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass pixel_values/pixel_values_videos, not mm_encoder_outputs, to a compressed "
                             "Qwen2.5-Omni (tokenzip computes the features itself)")
        plans = self._plan(kwargs)
        positions = self._original_positions(kwargs)[-3:]
        feats: dict[str, list[torch.Tensor]] = {}
        signals: dict[str, list[dict[str, torch.Tensor]]] = {}
        audio_extra: list[dict[str, Any]] = []
        if kwargs.get("input_features") is not None and self.audio_cuts is not None:  # stage "encoder"
            owners = [p.sample for p in sorted((p for p in plans if p.modality == "audio"), key=lambda p: p.source)]
            feats["audio"], signals["audio"], audio_extra = self._encode_audio_in_tower(kwargs, needs, owners)
        elif kwargs.get("input_features") is not None:
            feats["audio"], signals["audio"] = self._encode_audio(kwargs, needs)
        for modality, pixels, key in (("image", "pixel_values", "image_grid_thw"),
                                      ("video", "pixel_values_videos", "video_grid_thw")):
            if kwargs.get(pixels) is not None:
                feats[modality], signals[modality] = self._encode_vision(
                    modality, kwargs[pixels], self._grid(kwargs, key, pixels), needs)
        text_ids = set(self.token.values())
        items: list[Item] = []
        for p in plans:
            tokens = feats[p.modality][p.source]
            sig = dict(signals[p.modality][p.source])
            if "projected" in needs:
                sig["projected"] = tokens
            if "text" in needs or "text_mask" in needs:
                sig.update(text_signals(self.core.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                                        text_ids, p.sample))
            slots, layout, extra = p.slots, p.layout, {}
            if p.modality == "audio" and audio_extra:
                extra = dict(audio_extra[p.source])
                units = extra.pop("units", None)
                if units is not None:  # after a schedule's earlier cuts: the units left, at their representatives
                    slots, layout = slots[units.to(slots.device)], L.audio(int(units.numel()))
            pos = positions[:, p.sample, slots.to(positions.device)].cpu()
            t = pos[0]
            extra.update({"slots": slots.cpu(), "positions": pos,
                          "seconds": (t - t[0]).float() / self.position_id_per_seconds, "chunk": self._chunks(t)})
            if p.modality == "video":
                extra["frames"] = p.layout.segments[0].t
                extra["second_per_grid"] = float(self._video_seconds(
                    kwargs, kwargs["video_grid_thw"].shape[0])[p.source])
            if p.modality == "audio":
                extra["mel_frames"] = int(kwargs["feature_attention_mask"][p.source].sum())
            items.append(Item(p.modality, p.sample, tokens, layout, sig, extra))
        if kwargs.get("use_audio_in_video"):
            self._pair(input_ids, items)
        return items

    def _pair(self, input_ids: torch.Tensor, items: list[Item]) -> None:
        """``extra["partner"]`` of each video and the soundtrack interleaved with it (use_audio_in_video): the audio
        item whose first placeholder lies inside the video's ``<audio_bos> ... <audio_eos>`` block."""
        end_id = int(getattr(self.thinker.config, "audio_end_token_id", -1))
        for i, v in enumerate(items):
            if v.modality != "video":
                continue
            row = input_ids[v.sample]
            first = int(v.extra["slots"][0])
            ends = (row[first:] == end_id).nonzero().flatten()
            stop = first + int(ends[0]) if ends.numel() else row.shape[0]
            for j, a in enumerate(items):
                if a.modality == "audio" and a.sample == v.sample and first < int(a.extra["slots"][0]) < stop:
                    v.extra["partner"], a.extra["partner"] = j, i

    def _run_audio_tower(self, feats: torch.Tensor, fmask: torch.Tensor, attn_needs: frozenset[str]
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The audio tower's output (``get_audio_features``) and, when attention signals are needed, the input of its
        last layer's attention (a pre-hook), from which they are recomputed over each whole clip."""
        tower = self.core.audio_tower
        captured: dict[str, torch.Tensor] = {}

        def hook(module: torch.nn.Module, args: tuple, kw: dict) -> None:
            captured["x"] = args[0] if args else kw["hidden_states"]

        handle = tower.layers[-1].self_attn.register_forward_pre_hook(hook, with_kwargs=True) if attn_needs else None
        try:
            out = self.core.get_audio_features(feats, fmask.to(feats.device), return_dict=True).last_hidden_state
        finally:
            if handle is not None:
                handle.remove()
        return out, captured.get("x")

    def _encode_audio(self, kwargs: dict[str, Any], needs: frozenset[str]
                      ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        feats, fmask = self._audio_args(kwargs)
        tower = self.core.audio_tower
        frames, sizes = tower._get_feat_extract_output_lengths(fmask.sum(-1).long())
        waves = raw_waveforms(kwargs, feats.shape[0], "audio clip")
        attn_needs = needs & ATTENTION_SIGNALS
        out, last_in = self._run_audio_tower(feats, fmask, attn_needs)
        tokens = list(out.split([int(n) for n in sizes.tolist()]))
        bounds = [(e - f, e) for f, e in zip(frames.tolist(), frames.cumsum(0).tolist())]
        # the clip's frames as one full sequence (OmniZip: full, not the model's windows), per pooled pair
        per_clip = unit_signals(tower.layers[-1].self_attn, last_in, bounds,
                                [torch.arange(2 * n).view(n, 2) for n in sizes.tolist()], attn_needs) \
            if attn_needs else [{} for _ in tokens]
        if "speech" in needs:
            for i, (sig, n) in enumerate(zip(per_clip, sizes.tolist())):
                sig["speech"] = self._clip_speech(feats[i], int(fmask[i].sum()), None if waves is None else waves[i],
                                                  n).to(out.device)
        return tokens, per_clip

    def _clip_speech(self, feats: torch.Tensor, mel: int, wave: Any, n: int) -> torch.Tensor:
        """``speech`` of one clip's ``n`` LLM tokens: Silero on its waveform (40 ms per token), else the log-mel energy
        of its ``mel`` valid frames."""
        speech = silero_speech(wave, n, SAMPLES_PER_TOKEN) if wave is not None else None
        return energy_speech(clip_frames(feats, mel, MEL_PER_TOKEN * n), n) if speech is None else speech

    def _encode_vision(self, modality: str, pixels: torch.Tensor, grid: torch.Tensor, needs: frozenset[str]
                       ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        visual = self.core.visual
        unit = self.merge * self.merge
        if int(grid.prod(-1).sum()) != pixels.shape[0]:
            raise ValueError(f"{modality} pixels have {pixels.shape[0]} patches but the grid {grid.tolist()} needs "
                             f"{int(grid.prod(-1).sum())}")
        probe = _LastBlockProbe(visual.blocks[-1].attn, needs & ATTENTION_SIGNALS)
        fn = self.core.get_image_features if modality == "image" else self.core.get_video_features
        out = probe.run(lambda: fn(pixels, grid.to(pixels.device), return_dict=True))
        feats = list(out.pooler_output)
        self._keep_vision_outputs(modality, out)
        restore = self._merged_order(grid) if probe.needs else None
        grouped: dict[str, torch.Tensor] = {}
        for name, t in (("cls_attention", probe.received), ("keys", probe.keys)):
            if t is not None:  # per patch (block order) -> per merged token (raster order), as the merger
                g = t.reshape(t.shape[0] // unit, unit, *t.shape[1:]).mean(dim=1)
                grouped[name] = g if restore is None else g[restore.to(g.device)]
        per_item: list[dict[str, torch.Tensor]] = []
        start = 0
        for (t, h, w), f in zip(grid.tolist(), feats):
            n = f.shape[0]
            sig = {name: s[start: start + n] for name, s in grouped.items()}
            if "cls_attention" in sig:  # mean over the queries that can see the token: its image's / frame's patches
                sig["cls_attention"] = sig["cls_attention"] / (h * w)
            per_item.append(sig)
            start += n
        return feats, per_item

    def _merged_order(self, grid: torch.Tensor) -> torch.Tensor | None:
        """Where each merged token of the ViT's block order sits in raster order (the windows the model undoes
        after its merger); ``None`` when the blocks already run in raster order."""
        visual = self.core.visual
        order, _ = get_vision_window_index(grid, spatial_merge_size=self.merge, window_size=visual.window_size,
                                           patch_size=visual.patch_size)
        return torch.argsort(order)

    def _keep_vision_outputs(self, modality: str, out: Any) -> None:
        """Keep what else of the vision tower's output the rebuild needs (Qwen3-Omni: the DeepStack features)."""

    # ---- rebuild ------------------------------------------------------------------------------------------------
    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        outputs = self._audio_outputs(items, outputs)
        input_ids = kwargs["input_ids"]
        b, length = input_ids.shape
        positions = self._original_positions(kwargs)
        embed = self.core.get_input_embeddings()
        full = embed(input_ids)
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        for item, out in zip(items, outputs):
            slots = item.extra["slots"].to(input_ids.device)
            index = out.index[0].to(slots.device)
            order = torch.argsort(index)
            index = index[order]
            if index.numel() > 1 and bool((index[1:] == index[:-1]).any()):
                raise RuntimeError(f"two output tokens of a {item.modality} item share one representative input token")
            kept = slots[index]
            keep[item.sample, slots] = False
            keep[item.sample, kept] = True
            if item.modality == "audio" or self.visual_in_embeds:
                full[item.sample, kept] = out.tokens[0][order.to(out.tokens.device)].to(full.device, full.dtype)

        call = {key: v for key, v in kwargs.items() if key not in ("position_ids", *_MEDIA_KEYS)}
        new = shrink_sequences(call, keep, pad_id_for(self.thinker.config, set(self.token.values())))
        mask = kwargs.get("attention_mask")
        valid = keep & (torch.ones_like(keep) if mask is None else mask.bool())
        side = padding_side(mask)
        width = new["input_ids"].shape[1]
        new_pos = P.pack(positions, valid, side, width)
        new_mask = new["attention_mask"]
        if positions.shape[0] == 4:  # row 0 only builds the causal mask: contiguous over the new sequence
            new_pos[0] = P.text_row(new_mask, new_pos.dtype)
        self.core.rope_deltas = P.rope_deltas(new_pos[-3:], new_mask)
        new["position_ids"] = new_pos[0] if positions.shape[0] == 1 else new_pos
        embeds = P.pack(full.permute(2, 0, 1), valid, side, width).permute(1, 2, 0)
        new["inputs_embeds"] = embeds
        self._record_short(new["input_ids"], items, valid, side, outputs)
        return new

    def _audio_outputs(self, items: list[Item], outputs: list[CompressOutput]) -> list[CompressOutput]:
        """Stage "encoder": each audio item's output with the LLM tokens of its kept/merged units (the tower's layers
        after the cut and its tail, :meth:`_finish_audio`); the units' slots stay the method's ``index`` over the item
        (its tokens at the last cut, whose ``slots`` are their representatives' placeholders)."""
        if self.audio_cuts is None or self._audio_pass is None:
            return outputs
        audio = [i for i, it in enumerate(items) if it.modality == "audio"]  # the model's clip order
        tokens = self._finish_audio([outputs[i] for i in audio])
        new = list(outputs)
        for i, t in zip(audio, tokens):
            new[i] = CompressOutput(t.unsqueeze(0), outputs[i].source, outputs[i].index)
        return new

    def _record_short(self, ids: torch.Tensor, items: list[Item], valid: torch.Tensor, side: str,
                      outputs: list[CompressOutput]) -> None:
        """Each item's kept columns in the shortened prompt (stage "llm" of a ``tz.compose`` pipeline)."""
        width = ids.shape[1]
        new_col = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)
        for i in range(valid.shape[0]):
            n = int(valid[i].sum())
            new_col[i, valid[i]] = torch.arange(n, device=valid.device) + (width - n if side == "left" else 0)
        llm = []
        for item, out in zip(items, outputs):
            kept = item.extra["slots"].to(valid.device)[torch.sort(out.index[0].to(valid.device)).values]
            llm.append(LLMItem(item.modality, item.sample, new_col[item.sample, kept], None))
        self._short = (ids, llm)

    # ---- stage "input", reduction "frames" (module doc) ---------------------------------------------------------
    input_reductions = ("frames",)
    input_stage_note = "frames: video clips; images and audio pass whole"
    # the video processor's normalisation (Qwen2.5-Omni's is Qwen2VLVideoProcessor: CLIP mean/std, rescale 1/255)
    video_pixel_mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    video_pixel_std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)

    def input_plan(self, kwargs: dict[str, Any], reduction: str) -> list[InputItem]:
        """Each video clip with the counts of ``1 .. t`` kept temporal grids and one RGB frame per grid."""
        input_ids = require_input_ids(kwargs)
        if reduction not in self.input_reductions:
            raise TypeError(self._no_input_stage(reduction))
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass pixel_values_videos, not mm_encoder_outputs, to a Qwen-Omni model compressed by "
                             "frame selection (tokenzip selects the frames before the vision tower)")
        grid = self._grid(kwargs, "video_grid_thw", "pixel_values_videos")
        if grid is None:
            return []
        self._video_seconds(kwargs, grid.shape[0])
        m = self.merge
        return TG.frames_plan(input_ids, TG.clip_rows(kwargs["pixel_values_videos"], grid), grid, self.video_token_id,
                              qwen_patch_spec(self, self.thinker.config.vision_config), self.video_pixel_mean,
                              self.video_pixel_std, lambda t, h, w: L.frames(t, h // m, w // m))

    @torch.no_grad()
    def rescale_inputs(self, kwargs: dict[str, Any], reduction: str, items: list[InputItem], targets: list[int]
                       ) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The call with each clip's kept temporal grids, their placeholders only, at their full-call positions."""
        if reduction not in self.input_reductions:
            raise TypeError(self._no_input_stage(reduction))
        grid = self._grid(kwargs, "video_grid_thw", "pixel_values_videos")
        return TG.gathered_frames_call(self, kwargs, items, targets, grid,
                                       pad_id_for(self.thinker.config, set(self.token.values())))

    # ---- stage "llm" --------------------------------------------------------------------------------------------
    def llm_items(self, kwargs: dict[str, Any]) -> list:
        """Each item's placeholder columns (module doc), or [] for a call without media (a decoding step). A call this
        adapter's ``rebuild`` made in this patched call (its shortened prompt and ``inputs_embeds``) takes the items
        recorded there, before anything else: it no longer carries the audio features (they are in
        ``inputs_embeds``), and on Qwen3-Omni it does carry the kept visual tokens as ``mm_encoder_outputs``, so
        planning from its arguments would find the images/videos but lose every audio item."""
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            return []
        short = self._short
        embeds = kwargs.get("inputs_embeds")
        if short is not None and embeds is not None and tuple(embeds.shape[:2]) == tuple(short[0].shape) \
                and (ids is None or torch.equal(ids, short[0])):
            return list(short[1])
        if self._has_items(kwargs):
            return [LLMItem(p.modality, p.sample, p.slots, p.layout) for p in self._plan(kwargs)]
        return []

    def release(self) -> None:
        self._short = None  # the shortened prompt belongs to the call that rebuilt it
        self._audio_pass = None  # stage "encoder": the audio tower's pass of the call
