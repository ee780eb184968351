"""Whisper (``WhisperForConditionalGeneration``): compress the encoder's output before the decoder's cross-attention
(stage ``pre_llm``), or its hidden states between two encoder layers (stage ``encoder``, ``tz.InEncoder``).

One item per batch row: the encoder's ``N = max_source_positions`` frames (1,500 for a 30 s window, 20 ms each),
layout ``[(1, N)]``. The adapter runs the encoder itself (up to the cut for the encoder stage, then the remaining
layers on the compressed frames), the method compresses each row, and while the patched call runs the encoder's
``forward`` is substituted: called on the call's own ``input_features`` rows it returns their compressed frames
(rows matched by value). So the original ``forward()``/``generate()`` get the caller's ``input_features`` unchanged
and all of Whisper's own generate() logic runs as usual — including the temperature fallback
(``temperature=(0.0, 0.2, ...)``, ``compression_ratio_threshold``, ``logprob_threshold``), which re-runs generate()
on the rows that failed; passing precomputed ``encoder_outputs`` instead would break that path. Short-form only
(<= 30 s per row): long-form input gets a ValueError.

Budget: ``N`` is the whole window, padding included (Whisper always pads to 30 s, and the decoder reads every
frame). So every row of a batch has the same ``N`` and the same ``k``: no cross-attention mask is needed — good,
because ``WhisperDecoder`` passes ``encoder_attention_mask=None`` to its layers and has no way to mask encoder frames.
If rows ever came back with different counts the adapter raises instead of padding with frames the decoder would
attend to. The feature ``attention_mask`` (only used by Whisper for SpecAugment and long-form seeking) is dropped.

Proportional attention (on by default, ``WhisperAdapter.proportional_attention``): a merged output token stands for
``s`` encoder frames, so the adapter adds ``log(s)`` to the decoder's cross-attention logits for it (ToMe's
proportional attention, "Token Merging: Your ViT But Faster", arXiv:2210.09461), through forward pre-hooks on each
decoder layer's ``encoder_attn`` that pass it as the (otherwise unused) additive attention mask. The decoder then
spreads its attention over time as it would over the full sequence; without it, a 30 s window whose padding was
pooled into a few tokens loses the "nothing more is said" evidence and greedy decoding loops (LibriVox clips
padded to 30 s, vad_prune at retain 0.1: WER 237% without, 5.6% with). For the encoder stage the same bias goes
into the self-attention of the encoder layers after the cut. Pure selections (every size 1) get no bias. The hooks
live until the patch is removed (``close``); they only act on key/value sequences of the compressed length.

Signals: ``cls_attention``/``keys`` from the last encoder layer (for the encoder stage: the layer before the cut,
the one that made the tokens; recomputed from its q/k projections, no eager
attention; Whisper has no CLS, so ``cls_attention`` is the mean attention each frame receives), ``speech``: the
probability that each encoder frame holds speech. ``speech`` comes from Silero VAD (package ``silero-vad``) when the
call carries the raw 16 kHz waveforms as ``raw_audio=[wave, ...]`` (a tokenzip-only keyword, consumed here and never
passed to the model); otherwise, or when ``silero-vad`` is not installed, from the log-mel energy of the features
(:func:`energy_speech`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from .. import layout as L
from ..output import CompressOutput
from .base import Adapter, Item, ModelParts
from .probe import probe

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


class WhisperAdapter(Adapter):
    model_classes = ("WhisperForConditionalGeneration",)
    modalities = ("audio",)
    stages = ("pre_llm", "encoder")
    signals = frozenset({"cls_attention", "keys", "speech"})
    # ToMe's proportional attention in the decoder's cross-attention (and, for the encoder stage, in the encoder
    # layers after the cut): see the module docstring
    proportional_attention: bool = True

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.encoder = model.model.encoder
        self.cut: int | None = None  # encoder stage: compress the input of encoder layer `cut`; None: the output
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # features, out, bias
        self._bias: torch.Tensor | None = None  # [b, k] log group sizes of the rows the decoder is reading
        self._handles: list[Any] = []

    def set_encoder_layer(self, layer: int) -> None:
        """Encoder stage: compress the hidden states between encoder layers ``layer - 1`` and ``layer``."""
        n = len(self.encoder.layers)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= n - 1:
            raise ValueError(f"layer must be an int in [1, {n - 1}] for this Whisper encoder ({n} layers; compress "
                             f"its output with the method itself), got {layer!r}")
        self.cut = layer

    # ---- proportional attention ---------------------------------------------------------------------------------
    def _cross_attention_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kv = kwargs.get("key_value_states")
        bias = self._bias
        if kv is None or bias is None or kv.shape[1] != bias.shape[1] or kv.shape[0] % bias.shape[0]:
            return args, kwargs  # not the compressed frames (e.g. a later call with other encoder_outputs)
        if kv.shape[0] != bias.shape[0]:  # beams / num_return_sequences expand the batch row-wise
            bias = bias.repeat_interleave(kv.shape[0] // bias.shape[0], dim=0)
        kwargs["attention_mask"] = _add_bias(kwargs.get("attention_mask"), bias, kv)
        return args, kwargs

    def _bias_of(self, outputs: list[CompressOutput]) -> torch.Tensor | None:
        """``[B, k]`` log group sizes, or None for pure selections (nothing to rebalance) or when disabled."""
        sizes = []
        for out in outputs:
            src = out.source[0]
            k = out.tokens.shape[1]
            sizes.append(torch.zeros(k, device=src.device).scatter_add_(0, src.clamp(min=0), (src >= 0).float()))
        size = torch.stack(sizes).clamp(min=1)
        if not self.proportional_attention or not bool((size > 1).any()):
            return None
        return size.log()

    # ---- the encoder, substituted while a compressed call runs ---------------------------------------------------
    def _encoder_forward(self, input_features: torch.Tensor | None = None, attention_mask: Any = None,
                         **kwargs: Any) -> BaseModelOutput:
        """The encoder's forward() while the patch is installed: rows of the call being compressed get their
        compressed output (matched by value, since Whisper's temperature fallback re-runs generate() on a subset
        of the rows); outside such a call the original encoder runs."""
        pending = self._pending
        if pending is None or input_features is None:
            return self._original_encoder_forward(input_features, attention_mask, **kwargs)
        feats, hidden, bias = pending
        rows = []
        for row in input_features:
            hit = next((i for i in range(feats.shape[0]) if torch.equal(row, feats[i].to(row.dtype))), None)
            if hit is None:  # never hand the decoder uncompressed frames inside a compressed call
                raise RuntimeError("Whisper's encoder was called, inside a compressed generate()/forward(), on "
                                   "input_features that are not rows of the call's own (long-form seeking is not "
                                   "supported: split audio into 30 s windows)")
            rows.append(hit)
        idx = torch.tensor(rows, device=hidden.device)
        self._bias = None if bias is None else bias[idx]
        return BaseModelOutput(last_hidden_state=hidden[idx].to(input_features.device))

    def _original_encoder_forward(self, *args: Any, **kwargs: Any) -> BaseModelOutput:
        return type(self.encoder).forward(self.encoder, *args, **kwargs)

    def _install(self) -> None:
        if self._handles:
            return
        self._handles = [layer.encoder_attn.register_forward_pre_hook(self._cross_attention_hook, with_kwargs=True)
                         for layer in self.model.model.decoder.layers]
        self.encoder.forward = self._encoder_forward

    def release(self) -> None:
        """The compressed call is over: the encoder computes from scratch again (called by the patch)."""
        self._pending = None
        self._bias = None

    def close(self) -> None:
        """Remove the hooks and the encoder substitution (called when the patch is removed)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.encoder.__dict__.pop("forward", None)
        self.release()

    def parts(self) -> ModelParts:
        decoder = self.model.model.decoder
        return ModelParts(encoder=self.encoder, encoder_layers=self.encoder.layers, projector=None,
                          language_model=decoder, decoder_layers=decoder.layers, final_norm=decoder.layer_norm,
                          embed=decoder.embed_tokens)

    def has_media(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("input_features") is not None

    def batch_size(self, kwargs: dict[str, Any]) -> int:
        return kwargs["input_features"].shape[0]

    def _raw_audio(self, kwargs: dict[str, Any], b: int) -> list[Any] | None:
        return raw_waveforms(kwargs, b, "batch row")

    def _embed(self, feats: torch.Tensor) -> torch.Tensor:
        """The encoder's input to its first layer (its own convolutions and positions, as WhisperEncoder does)."""
        enc = self.encoder
        x = torch.nn.functional.gelu(enc.conv1(feats))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        return x + enc.embed_positions.weight[: x.shape[1]]

    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        feats = kwargs["input_features"]
        if not isinstance(feats, torch.Tensor) or feats.dim() != 3:
            raise ValueError(f"input_features must be a [batch, mel, frames] tensor, got "
                             f"{getattr(feats, 'shape', type(feats))}")
        expected = self.model.config.max_source_positions * self.encoder.conv1.stride[0] * \
            self.encoder.conv2.stride[0]
        if feats.shape[-1] != expected:
            raise ValueError(f"input_features must hold one {expected}-frame (30 s) window per row, got "
                             f"{feats.shape[-1]} frames: long-form audio is not supported, split it into 30 s "
                             f"windows (tokenzip.zoo.whisper.features pads and checks)")
        b = feats.shape[0]
        raw = self._raw_audio(kwargs, b)
        x = feats.to(self.encoder.conv1.weight.dtype)
        if self.cut is None:  # the output: the signals come from the last layer, which made the tokens
            with probe(self.encoder.layers[-1].self_attn, needs, None) as p:
                hidden = self.encoder(x, return_dict=True).last_hidden_state
        else:  # the input of layer `cut`: the signals come from layer `cut - 1`, which made it
            hidden = self._embed(x)
            *before, last = self.encoder.layers[: self.cut]
            for layer in before:
                hidden = _layer_out(layer(hidden, None))
            with probe(last.self_attn, needs, None) as p:
                hidden = _layer_out(last(hidden, None))
        n = hidden.shape[1]
        items = []
        for i in range(b):
            sig = {name: t[i] for name, t in p.results.items()}
            if "speech" in needs:
                speech = silero_speech(raw[i], n) if raw is not None else None
                sig["speech"] = (speech if speech is not None else energy_speech(feats[i], n)).to(hidden.device)
            items.append(Item("audio", i, hidden[i], L.audio(n), sig))
        return items

    @torch.no_grad()
    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        counts = {out.tokens.shape[1] for out in outputs}
        if len(counts) != 1:
            raise RuntimeError(f"Whisper's decoder cannot mask encoder frames, but rows were compressed to different "
                               f"counts {sorted(counts)}")
        hidden = torch.cat([out.tokens for out in outputs], dim=0)
        bias = self._bias_of(outputs)
        if self.cut is not None:  # the rest of the encoder runs on the compressed frames
            mask = None if bias is None else _add_bias(None, bias, hidden)
            for layer in self.encoder.layers[self.cut:]:
                hidden = _layer_out(layer(hidden, mask))
            hidden = self.encoder.layer_norm(hidden)
        self._install()
        self._pending = (kwargs["input_features"], hidden, bias)  # the encoder substitution hands these out
        new = dict(kwargs)
        for key in ("attention_mask", RAW_AUDIO):  # Whisper only uses the feature mask for SpecAugment/long-form
            new.pop(key, None)
        return new


def _layer_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _add_bias(mask: torch.Tensor | None, bias: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` plus the per-key log group sizes ``bias`` ``[B, k]`` as an additive ``[B, 1, 1, k]`` mask."""
    bias = bias[:, None, None, :].to(device=like.device, dtype=like.dtype)
    return bias if mask is None else mask + bias
