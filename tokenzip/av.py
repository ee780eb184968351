"""Audio + video input for Qwen2.5-Omni: decode a clip's frames and soundtrack (PyAV), and build the thinker's inputs
with the model's own processor pieces, without torchvision.

- :func:`read_av` decodes a file's video frames at a target fps (``tokenzip.video.read_video``) and its first audio
  track as 16 kHz mono float32 (PyAV's resampler).
- :func:`omni_block` is the token sequence of one video / audio / image in a Qwen2.5-Omni prompt: with
  ``use_audio_in_video``, ``<vision_bos><audio_bos> [video chunk][audio chunk] ... <audio_eos><vision_eos>`` cut into
  ``seconds_per_chunk`` windows of TMRoPE time exactly as ``Qwen2_5OmniProcessor.replace_video_with_audio_token``
  does (it calls the processor's own ``get_chunked_index``).
- :func:`omni_video_pixels` turns frames into ``pixel_values_videos`` / ``video_grid_thw`` the way
  ``Qwen2VLVideoProcessor`` does (Qwen2.5-Omni's video processor): :func:`tokenzip.video.qwen_video_pixels`, with
  :class:`tokenzip.video.QwenVideoSettings` (``OmniVideoSettings`` here).
- :func:`omni_av_inputs` puts it together: ``input_features`` / ``feature_attention_mask`` from the
  ``WhisperFeatureExtractor``, the video pixels, and a prompt with the right placeholder counts and markers.

Why not the processor: transformers' video processors need torchvision, which cannot be installed next to a CPU-only
torch here (see tokenzip/video.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .deps import require
from .video import QwenVideoSettings, open_media, qwen_video_pixels

SAMPLING_RATE = 16000


# ---- decoding ------------------------------------------------------------------------------------------------------
@dataclass
class AVClip:
    """A clip's frames (``uint8 [T, H, W, 3]``, at ``timestamps`` seconds) and its soundtrack (16 kHz mono float32,
    ``None`` when the file has no audio track)."""

    frames: np.ndarray
    timestamps: np.ndarray
    audio: np.ndarray | None
    duration: float


def read_audio(path: str | Path, sampling_rate: int = SAMPLING_RATE) -> np.ndarray | None:
    """The first audio track of a media file as mono float32 in [-1, 1] at ``sampling_rate`` Hz (PyAV's resampler),
    or ``None`` when the file has no audio track."""
    with open_media(path, "media file") as container:
        av = require("av")
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
        parts = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):  # flush
            parts.append(out.to_ndarray().reshape(-1))
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, dtype=np.float32)


def read_av(path: str | Path, fps: float = 2.0, max_seconds: float | None = None) -> AVClip:
    """Frames at ``fps`` (the frame on screen at every ``1 / fps`` s) and the 16 kHz mono soundtrack of a file,
    both cut to the first ``max_seconds`` when given."""
    from .video import read_video

    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
    video = read_video(path, fps=fps)
    frames, times = video.frames, video.timestamps
    audio = read_audio(path)
    duration = float(video.duration)
    if max_seconds is not None:
        keep = times < max_seconds
        frames, times = frames[keep], times[keep]
        duration = min(duration, float(max_seconds))
        if audio is not None:
            audio = audio[: int(round(max_seconds * SAMPLING_RATE))]
    return AVClip(frames, times, audio, duration)


# ---- prompt ----------------------------------------------------------------------------------------------------------
def omni_audio_tokens(mel_frames: int, config: Any = None) -> int:
    """LLM tokens of a clip of ``mel_frames`` valid log-mel frames (the audio encoder's output length): Qwen2.5-Omni's
    (25 per second), or Qwen3-Omni's (13 per 100 frames) when ``config`` is a Qwen3-Omni thinker config."""
    if config is not None and str(getattr(config, "model_type", "")).startswith("qwen3_omni"):
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

        return int(_get_feat_extract_output_lengths(torch.tensor(int(mel_frames))))
    return ((int(mel_frames) - 1) // 2 + 1 - 2) // 2 + 1


def omni_block(config: Any, *, video_grid: Sequence[int] | None = None, second_per_grid: float | None = None,
               audio_tokens: int | None = None, image_grid: Sequence[int] | None = None,
               use_audio_in_video: bool = False) -> list[int]:
    """Token ids of one media block of a Qwen2.5-Omni thinker prompt (``config``: the thinker's config).

    An image: ``<vision_bos> <image> * (t h w / 4) <vision_eos>``; an audio clip: ``<audio_bos> <audio> * n
    <audio_eos>``; a video: ``<vision_bos> <video> * (t h w / 4) <vision_eos>``; a video with its soundtrack
    (``use_audio_in_video``): ``<vision_bos><audio_bos>`` then, per ``seconds_per_chunk`` window of TMRoPE time, the
    window's video tokens and then its audio tokens, ``<audio_eos><vision_eos>`` (the processor's layout); for a
    Qwen3-Omni thinker config, the two streams merged token by token by time, as its processor does."""
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor

    merge = int(config.vision_config.spatial_merge_size)
    vbos, veos = int(config.vision_start_token_id), int(config.vision_end_token_id)
    abos, aeos = int(config.audio_start_token_id), int(config.audio_end_token_id)
    if image_grid is not None:
        t, h, w = (int(x) for x in image_grid)
        return [vbos] + [int(config.image_token_id)] * (t * h * w // merge ** 2) + [veos]
    if video_grid is None:
        if audio_tokens is None:
            raise ValueError("give image_grid, video_grid or audio_tokens")
        return [abos] + [int(config.audio_token_id)] * int(audio_tokens) + [aeos]
    t, h, w = (int(x) for x in video_grid)
    per_grid = h * w // merge ** 2
    if not use_audio_in_video:
        return [vbos] + [int(config.video_token_id)] * (t * per_grid) + [veos]
    if audio_tokens is None or second_per_grid is None:
        raise ValueError("use_audio_in_video needs audio_tokens and second_per_grid")
    rate = float(config.position_id_per_seconds)
    video_t = np.repeat(np.arange(t) * float(second_per_grid) * rate, per_grid)
    if str(getattr(config, "model_type", "")).startswith("qwen3_omni"):
        # Qwen3-Omni's processor: token by token by time, a video token first when its grid starts at or before the
        # audio token's time (one position id per audio token)
        out, v, a = [vbos, abos], 0, 0
        while v < video_t.size and a < int(audio_tokens):
            if video_t[v] <= a:
                out.append(int(config.video_token_id))
                v += 1
            else:
                out.append(int(config.audio_token_id))
                a += 1
        out += [int(config.video_token_id)] * (video_t.size - v)
        out += [int(config.audio_token_id)] * (int(audio_tokens) - a)
        return out + [aeos, veos]
    per_chunk = int(rate * float(config.seconds_per_chunk))
    chunked = Qwen2_5OmniProcessor.get_chunked_index  # the processor's own windowing (it does not use self)
    video_chunks = chunked(None, video_t, per_chunk)
    audio_chunks = chunked(None, np.arange(int(audio_tokens)), per_chunk)
    out = [vbos, abos]
    for j in range(max(len(video_chunks), len(audio_chunks))):
        if j < len(video_chunks):
            out += [int(config.video_token_id)] * (video_chunks[j][1] - video_chunks[j][0])
        if j < len(audio_chunks):
            out += [int(config.audio_token_id)] * (audio_chunks[j][1] - audio_chunks[j][0])
    return out + [aeos, veos]


# ---- model inputs --------------------------------------------------------------------------------------------------
# Qwen2.5-Omni's video processor is Qwen2-VL's: its settings and pixels are tokenzip.video's
OmniVideoSettings = QwenVideoSettings


def omni_video_pixels(frames: np.ndarray | torch.Tensor, settings: QwenVideoSettings | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values_videos [t*h*w, 3*T*p*p] float32, video_grid_thw [1, 3])`` of one clip of ``uint8 [T, H, W, 3]``
    frames, as the Qwen2-VL video processor computes them (:func:`tokenzip.video.qwen_video_pixels`)."""
    return qwen_video_pixels([frames], settings)


def omni_feature_extractor(model: torch.nn.Module | None = None) -> Any:
    """The ``WhisperFeatureExtractor`` of Qwen2.5-Omni (128 mel bins, 16 kHz, hop 160), sized to the model's
    ``num_mel_bins`` when given (tiny test models)."""
    from transformers import WhisperFeatureExtractor

    bins = 128 if model is None else int(getattr(model, "thinker", model).config.audio_config.num_mel_bins)
    return WhisperFeatureExtractor(feature_size=bins, sampling_rate=SAMPLING_RATE)


def omni_audio_features(waves: Sequence[np.ndarray], feature_extractor: Any = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_features [clips, mel, frames], feature_attention_mask [clips, frames])`` of 16 kHz mono waveforms by
    the ``WhisperFeatureExtractor`` exactly as the processor calls it (``padding="max_length"``: 30 s,
    ``return_attention_mask``) when every clip fits in 30 s. The processor cuts longer clips at 30 s; here they are
    kept whole instead (padded to the longest, not truncated: the thinker encodes any length in its windows), which
    the processor has no equivalent of. (Padding to the longest clip is not the same for short clips: the STFT of the
    last frames sees zeros instead of the 30 s padding's reflection, and log-mel's clamp is per padded clip.)"""
    fe = feature_extractor if feature_extractor is not None else omni_feature_extractor()
    if not waves:
        raise ValueError("waves is empty: give at least one 16 kHz mono waveform")
    arrays = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
    if any(a.size < 400 for a in arrays):
        raise ValueError("every waveform needs at least 400 samples (one 25 ms analysis window at 16 kHz)")
    fits = max(a.size for a in arrays) <= int(fe.n_samples)
    out = fe(arrays, sampling_rate=SAMPLING_RATE, return_attention_mask=True,
             padding="max_length" if fits else "longest", truncation=False, return_tensors="pt")
    return out["input_features"], out["attention_mask"].long()


def omni_av_inputs(model: torch.nn.Module, clips: Sequence[AVClip], prompts: Sequence[tuple[Sequence[int],
                   Sequence[int]]], *, fps: float, use_audio_in_video: bool = True,
                   video_settings: QwenVideoSettings | None = None, feature_extractor: Any = None,
                   pad_token_id: int = 0) -> dict[str, Any]:
    """A left-padded batch for the Qwen2.5-Omni thinker: sample ``i`` is ``prompts[i][0]`` (token ids before the
    media), the clip's block (:func:`omni_block`: its video, with its soundtrack interleaved when
    ``use_audio_in_video``, else followed by it; a clip without audio is video only) and ``prompts[i][1]``. ``fps``:
    the rate the frames were read at (``video_second_per_grid = temporal_patch_size / fps``). Returns what the
    processor returns (``input_ids``, ``attention_mask``, ``pixel_values_videos``, ``video_grid_thw``,
    ``video_second_per_grid``, and with audio ``input_features``, ``feature_attention_mask``), plus
    ``use_audio_in_video`` (which must reach ``forward``/``generate``). For the VAD signal, pass the clips'
    waveforms (``clip.audio``) as ``raw_audio=[...]`` to the compressed model too."""
    if len(clips) != len(prompts) or not clips:
        raise ValueError(f"give one (before, after) prompt per clip: {len(prompts)} prompts for {len(clips)} clips")
    if not (isinstance(fps, (int, float)) and fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    thinker = getattr(model, "thinker", model)
    cfg = thinker.config
    s = video_settings if video_settings is not None else QwenVideoSettings.for_model(model)
    pixels, grids = qwen_video_pixels([c.frames for c in clips], s)
    waves = [c.audio for c in clips if c.audio is not None]
    feats = fmask = None
    if waves:
        feats, fmask = omni_audio_features(waves, feature_extractor or omni_feature_extractor(model))
    rows, a = [], 0
    for clip, grid, (before, after) in zip(clips, grids, prompts):
        t, h, w = grid.tolist()
        if clip.audio is None:
            block = omni_block(cfg, video_grid=(t, h, w))
        else:
            n = omni_audio_tokens(int(fmask[a].sum()), cfg)
            a += 1
            block = omni_block(cfg, video_grid=(t, h, w), second_per_grid=s.temporal_patch_size / fps,
                               audio_tokens=n, use_audio_in_video=True) if use_audio_in_video else \
                omni_block(cfg, video_grid=(t, h, w)) + omni_block(cfg, audio_tokens=n)
        rows.append([int(x) for x in before] + block + [int(x) for x in after])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixels,
                           "video_grid_thw": grids,
                           "video_second_per_grid": torch.full((len(clips),), s.temporal_patch_size / fps)}
    if feats is not None:
        out.update(input_features=feats, feature_attention_mask=fmask)
        if use_audio_in_video:
            out["use_audio_in_video"] = True
    return out


__all__ = ["AVClip", "OmniVideoSettings", "SAMPLING_RATE", "omni_audio_features", "omni_audio_tokens",
           "omni_av_inputs", "omni_block", "omni_feature_extractor", "omni_video_pixels", "read_audio", "read_av"]
