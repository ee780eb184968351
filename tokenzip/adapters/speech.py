"""Speech signals for audio adapters: the ``speech`` probability of each encoder frame/token, from Silero VAD on
the raw 16 kHz waveforms a call passes as ``raw_audio=[wave, ...]`` (a tokenzip-only keyword), or from the log-mel
energy of Whisper-style features when no waveform is given or ``silero-vad`` is not installed."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

SAMPLING_RATE = 16000
RAW_AUDIO = "raw_audio"


@functools.lru_cache(maxsize=1)
def _silero() -> Any:
    """The Silero VAD model (ONNX through onnxruntime, ~40x faster on CPU than its TorchScript twin, which is the
    second choice), or ``None`` when the package is missing (importing it sets torch's thread count to 1; we restore
    it)."""
    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad
    except Exception:  # missing package: energy fallback
        torch.set_num_threads(threads)
        return None
    try:
        for onnx in (True, False):
            try:
                return load_silero_vad(onnx=onnx)
            except Exception:
                continue
        return None
    finally:
        torch.set_num_threads(threads)


def silero_speech(wave: Any, n_frames: int, frame_samples: int = 320) -> torch.Tensor | None:
    """Silero's speech probability for each of ``n_frames`` encoder frames (``frame_samples`` samples each) of a
    16 kHz mono waveform; frames past the end of the audio (padding) get 0. ``None`` when Silero is unavailable."""
    model = _silero()
    if model is None:
        return None
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32)).flatten()
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        raise ValueError(f"{RAW_AUDIO}: every waveform must be non-empty and finite")
    with torch.no_grad():
        probs = model.audio_forward(x.unsqueeze(0), SAMPLING_RATE)[0].float()  # one per 512 samples (32 ms)
    model.reset_states()
    centers = torch.arange(n_frames, dtype=torch.float64) * frame_samples + frame_samples / 2
    chunk = (centers // 512).long().clamp(max=probs.numel() - 1)
    out = probs[chunk]
    out[centers >= x.numel()] = 0.0
    return out


def energy_speech(features: torch.Tensor, n_frames: int, margin: float = 0.5, width: float = 0.12) -> torch.Tensor:
    """Energy-based speech score in [0, 1] per encoder frame from Whisper log-mel ``features`` ``[mel, T]``.

    Whisper's features are ``(max(log10 mel, peak - 8) + 4) / 4``, so 0.5 unit is 20 dB. A frame's level is the
    mean over mel bins of its (two) feature frames; the score is a sigmoid centred ``margin`` units (20 dB) below
    the clip's loud level (95th percentile), i.e. frames more than ~20 dB under the speech level count as silence.
    Padding sits at the floor and scores ~0.
    """
    level = features.float().mean(dim=0)  # [T]
    per = level.shape[0] // n_frames
    level = level[: per * n_frames].view(n_frames, per).mean(dim=1)
    loud = torch.quantile(level, 0.95)
    return torch.sigmoid((level - (loud - margin)) / width)


def clip_frames(features: torch.Tensor, valid: int, count: int) -> torch.Tensor:
    """A clip's feature frames ``[mel, count]`` for :func:`energy_speech`, taken from its ``valid`` frames only
    (``features`` ``[mel, T]`` may carry the batch's padding after them): the first ``count``, or all of them with the
    last one repeated up to ``count`` when the clip's last token covers a partial window (``count`` is its tokens
    times the feature frames per token). The padding a batch adds depends on the other clips of the call, so a clip's
    score never reads it: a clip scores the same alone and in any batch."""
    valid = max(1, min(int(valid), int(features.shape[-1])))
    x = features[..., :valid]
    if valid >= count:
        return x[..., :count]
    return torch.cat([x, x[..., -1:].expand(*x.shape[:-1], count - valid)], dim=-1)


def raw_waveforms(kwargs: dict[str, Any], count: int, unit: str) -> list[Any] | None:
    """The tokenzip-only ``raw_audio=`` argument (16 kHz mono waveforms for the VAD signal), validated: one 1-D
    waveform per ``unit`` (``count`` of them), or None when the call does not pass it."""
    raw = kwargs.get(RAW_AUDIO)
    if raw is None:
        return None
    if isinstance(raw, torch.Tensor) and raw.dim() == 1:
        raw = [raw]
    if len(raw) != count:
        raise ValueError(f"{RAW_AUDIO} must hold one 16 kHz mono waveform per {unit} ({count}), got {len(raw)}")
    for i, w in enumerate(raw):
        if np.asarray(w).ndim != 1:
            raise ValueError(f"{RAW_AUDIO}[{i}] must be a 1-D 16 kHz mono waveform, got shape "
                             f"{np.asarray(w).shape}")
    return list(raw)
