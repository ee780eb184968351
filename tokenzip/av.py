"""Audio + video input for Qwen2.5-Omni: decode a clip's frames and soundtrack (PyAV), and build the thinker's inputs
with the model's own processor pieces, without torchvision.

- :func:`read_av` decodes a file's video frames at a target fps (``tokenzip.video.read_video``) and its first audio
  track as 16 kHz mono float32 (PyAV's resampler).
- :func:`omni_block` is the token sequence of one video / audio / image in a Qwen2.5-Omni prompt: with
  ``use_audio_in_video``, ``<vision_bos><audio_bos> [video chunk][audio chunk] ... <audio_eos><vision_eos>`` cut into
  ``seconds_per_chunk`` windows of TMRoPE time exactly as ``Qwen2_5OmniProcessor.replace_video_with_audio_token``
  does (it calls the processor's own ``get_chunked_index``).
- :func:`omni_video_pixels` turns frames into ``pixel_values_videos`` / ``video_grid_thw`` the way
  ``Qwen2VLVideoProcessor`` does (smart resize to multiples of ``patch_size * merge_size``, bicubic, rescale and
  normalise, temporal padding by repeating the last frame, patch flattening in the model's group order).
- :func:`omni_av_inputs` puts it together: ``input_features`` / ``feature_attention_mask`` from the
  ``WhisperFeatureExtractor``, the video pixels, and a prompt with the right placeholder counts and markers.

Why not the processor: transformers' video processors need torchvision, which cannot be installed next to a CPU-only
torch here (see tokenzip/video.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .deps import require

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
    av = require("av")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"media file not found: {path}")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    with container:
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
def omni_audio_tokens(mel_frames: int) -> int:
    """LLM tokens of a clip of ``mel_frames`` valid log-mel frames (the audio encoder's output length)."""
    return ((int(mel_frames) - 1) // 2 + 1 - 2) // 2 + 1


def omni_block(config: Any, *, video_grid: Sequence[int] | None = None, second_per_grid: float | None = None,
               audio_tokens: int | None = None, image_grid: Sequence[int] | None = None,
               use_audio_in_video: bool = False) -> list[int]:
    """Token ids of one media block of a Qwen2.5-Omni thinker prompt (``config``: the thinker's config).

    An image: ``<vision_bos> <image> * (t h w / 4) <vision_eos>``; an audio clip: ``<audio_bos> <audio> * n
    <audio_eos>``; a video: ``<vision_bos> <video> * (t h w / 4) <vision_eos>``; a video with its soundtrack
    (``use_audio_in_video``): ``<vision_bos><audio_bos>`` then, per ``seconds_per_chunk`` window of TMRoPE time, the
    window's video tokens and then its audio tokens, ``<audio_eos><vision_eos>`` (the processor's layout)."""
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
    rate = int(config.position_id_per_seconds)
    per_chunk = int(rate * float(config.seconds_per_chunk))
    video_t = np.repeat(np.arange(t) * float(second_per_grid) * rate, per_grid)
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


__all__ = ["AVClip", "SAMPLING_RATE", "omni_audio_tokens", "omni_block", "read_audio", "read_av"]
