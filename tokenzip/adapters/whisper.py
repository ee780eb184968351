"""Whisper (``WhisperForConditionalGeneration``): compress the encoder's output before the decoder's cross-attention
(stage ``pre_llm``), or its hidden states between two encoder layers (stage ``encoder``, ``tz.InEncoder``).

One item per batch row: the encoder's ``N = max_source_positions`` frames (1,500 for a 30 s window, 20 ms each),
layout ``[(1, N)]``. The adapter runs the encoder itself — for the encoder stage on the generic encoder runner
(:mod:`tokenzip.encoder`; :meth:`WhisperAdapter.encoder_spec` only says where Whisper keeps its convolution stem,
positions, layers and final norm): up to the cut (or through every cut of a schedule), then the remaining layers on
the compressed frames — the method compresses each row, and while the patched call runs the encoder's
``forward`` is substituted: called on the call's own ``input_features`` rows it returns their compressed frames
(rows matched by value). So the original ``forward()``/``generate()`` get the caller's ``input_features`` unchanged
and all of Whisper's own generate() logic runs as usual — including the temperature fallback
(``temperature=(0.0, 0.2, ...)``, ``compression_ratio_threshold``, ``logprob_threshold``), which re-runs generate()
on the rows that failed; passing precomputed ``encoder_outputs`` instead would break that path.

Long-form (more than 30 s of features, through ``generate()``): Whisper's own sequential long-form generate()
chooses each window (it seeks to the last timestamp it decoded, per recording of a batch) and encodes one batch of
windows at a time; the substituted encoder compresses each new batch of windows as it comes, with the same pipeline
(:meth:`WhisperAdapter.encode_windows`), and ``last_stats`` holds one entry per window row encoded. With
``raw_audio`` (one waveform per recording), each window's ``speech`` is the slice of Silero's probabilities over its
whole recording that the window covers (the window is located in its recording by value).

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

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from .. import layout as L
from .. import ops
from ..callstate import per_call
from ..encoder import EncoderRunner, EncoderSpec, MergedTokens
from ..output import CompressOutput
from .base import Adapter, Item, ModelParts
from .probe import probe
from .speech import RAW_AUDIO, energy_speech, raw_waveforms, silero_speech


class WhisperAdapter(Adapter):
    model_classes = ("WhisperForConditionalGeneration",)
    modalities = ("audio",)
    # per-call state, per thread (tokenzip/callstate.py)
    _pending = per_call()
    _state = per_call()
    _bias = per_call()
    stages = ("pre_llm", "encoder")
    signals = frozenset({"cls_attention", "keys", "speech"})
    # ToMe's proportional attention in the decoder's cross-attention (and, for the encoder stage, in the encoder
    # layers after the cut): see the module docstring
    proportional_attention: bool = True

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.encoder = model.model.encoder
        self.runner: EncoderRunner | None = None  # encoder stage: where to cut; None: compress the output
        self.step: Any = None  # encoder stage with a schedule: compresses at the cuts before the last one
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # features, out, bias
        self._state: MergedTokens | None = None  # encoder stage: the tokens at the last cut, from encode()
        self._bias: torch.Tensor | None = None  # [b, k] log group sizes of the rows the decoder is reading
        self._handles: list[Any] = []
        # long-form (``windowed``): the patch's callback that compresses one window, and whether it is running;
        # with raw_audio, the call's features, each recording's length (feature frames), waveforms and (lazily) its
        # Silero speech probabilities per encoder frame
        self._window_compress: Any = None
        self._in_window = False
        self._long: dict[str, Any] | None = None

    def encoder_spec(self) -> EncoderSpec:
        """Where things are in Whisper's encoder, for the generic encoder runner."""
        return EncoderSpec(embed=self._embed, layers=self.encoder.layers,
                           final_norm=self.encoder.layer_norm, attention=_self_attention)

    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        """Encoder stage: compress the hidden states between encoder layers ``layer - 1`` and ``layer``, or after
        each layer count of an increasing tuple (a schedule; ``step`` compresses at the cuts before the last)."""
        runner = EncoderRunner(self.encoder_spec(), layer)  # ValueError naming the valid layers
        if len(runner.cuts) > 1 and step is None:
            raise ValueError("a schedule of encoder cuts needs a compression step for the intermediate cuts")
        self.runner, self.step = runner, step

    @property
    def cut(self) -> int | None:
        """The (last) cut of the encoder stage, None when compressing the encoder's output."""
        return None if self.runner is None else self.runner.cuts[-1]

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
        return self._bias_of_sizes(torch.stack(sizes))

    def _bias_of_sizes(self, size: torch.Tensor) -> torch.Tensor | None:
        size = size.clamp(min=1)
        if not self.proportional_attention or not bool((size > 1).any()):
            return None
        return size.log()

    # ---- the encoder, substituted while a compressed call runs ---------------------------------------------------
    def _encoder_forward(self, input_features: torch.Tensor | None = None, attention_mask: Any = None,
                         **kwargs: Any) -> BaseModelOutput:
        """The encoder's forward() while the patch is installed: rows of the call being compressed get their
        compressed output (matched by value, since Whisper's temperature fallback re-runs generate() on a subset
        of the rows); outside such a call the original encoder runs."""
        if input_features is None or self._in_window:  # the adapter's own encode() of a long-form window
            return self._original_encoder_forward(input_features, attention_mask, **kwargs)
        rows = self._pending_rows(input_features)
        if rows is None and self._window_compress is not None:
            if input_features.shape[-1] != self._window_frames():  # e.g. forward() on long-form features
                return self._original_encoder_forward(input_features, attention_mask, **kwargs)  # Whisper's error
            # long-form: a new 30 s window (or a batch of them, one per recording still being transcribed)
            self._in_window = True
            try:
                self._window_compress({"input_features": input_features})  # -> encode, compress, rebuild
            finally:
                self._in_window = False
            rows = self._pending_rows(input_features)
        if rows is None and self._pending is None:  # outside a compressed call
            return self._original_encoder_forward(input_features, attention_mask, **kwargs)
        if rows is None:  # never hand the decoder uncompressed frames inside a compressed call
            raise RuntimeError("Whisper's encoder was called, inside a compressed generate()/forward(), on "
                               "input_features that are not rows of the call's own")
        _, hidden, bias = self._pending
        idx = torch.tensor(rows, device=hidden.device)
        self._bias = None if bias is None else bias[idx]
        return BaseModelOutput(last_hidden_state=hidden[idx].to(input_features.device))

    def _pending_rows(self, input_features: torch.Tensor) -> list[int] | None:
        """The row of the pending (compressed) features each row of ``input_features`` equals, or None when some
        row is not one of them (or nothing is pending)."""
        if self._pending is None:
            return None
        feats = self._pending[0]
        rows = []
        for row in input_features:
            hit = next((i for i in range(feats.shape[0]) if feats[i].shape == row.shape
                        and torch.equal(row, feats[i].to(row.dtype))), None)
            if hit is None:
                return None
            rows.append(hit)
        return rows

    def _window_frames(self) -> int:
        """Feature frames of one 30 s window (what the encoder takes: ``max_source_positions`` x its strides)."""
        return self.model.config.max_source_positions * self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]

    # ---- long-form: Whisper's own generate() seeks through the audio 30 s at a time ------------------------------
    def windowed(self, kwargs: dict[str, Any]) -> bool:
        feats = kwargs.get("input_features")
        return isinstance(feats, torch.Tensor) and feats.dim() == 3 and feats.shape[-1] > self._window_frames()

    def encode_windows(self, kwargs: dict[str, Any], compress: Any) -> dict[str, Any]:
        """Long-form input (more than 30 s of features): Whisper's generate() cuts the windows itself (where the
        previous window's last timestamp says, per recording, with its ``attention_mask`` giving each recording's
        length) and calls the encoder on each batch of windows; the substituted encoder compresses each such batch
        as it comes (``compress``), and re-runs on the same windows (the temperature fallback) reuse it. The
        call's ``attention_mask`` stays (long-form needs it). ``raw_audio`` (one waveform per recording) is
        consumed here: a window's place in its recording is only known inside generate(), so each window is found
        in the call's features by value and gets the matching slice of its recording's Silero probabilities."""
        feats = kwargs["input_features"]
        raw = raw_waveforms(kwargs, feats.shape[0], "recording")
        if raw is not None:
            mask = kwargs.get("attention_mask")
            lengths = (mask.sum(-1).tolist() if isinstance(mask, torch.Tensor)
                       else [feats.shape[-1]] * feats.shape[0])
            self._long = {"features": feats, "lengths": [int(v) for v in lengths], "raw": raw, "speech": {}}
        self._install()
        self._window_compress = compress
        new = dict(kwargs)
        new.pop(RAW_AUDIO, None)
        return new

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
        self._state = None
        self._bias = None
        self._window_compress = None
        self._in_window = False
        self._long = None

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

    def _window_speech(self, row: torch.Tensor, n: int) -> torch.Tensor | None:
        """Silero's speech probabilities of the ``n`` encoder frames of long-form window ``row`` ``[mel, W]``: the
        window is found in its recording (the call's features, matched by value over the recording's own frames;
        Whisper pads the rest of a window with zeros), and its recording's probabilities (computed once) are
        sliced there; frames past the recording get 0. ``None`` when Silero is unavailable (energy fallback)."""
        long = self._long
        stride = row.shape[-1] // n  # feature frames per encoder frame
        if not bool(row.any()):  # a row of zeros: generate()'s padding of a batch of windows (static cache)
            return row.new_zeros(n, dtype=torch.float32)
        for r, length in enumerate(long["lengths"]):
            full = long["features"][r].to(row.dtype)
            for s in (full[:, :length] == row[:, :1]).all(0).nonzero().flatten().tolist():
                span = min(row.shape[-1], length - s)
                if torch.equal(full[:, s: s + span], row[:, :span]) and not bool(row[:, span:].any()):
                    if r not in long["speech"]:
                        long["speech"][r] = silero_speech(long["raw"][r], -(-length // stride) + n)
                    probs = long["speech"][r]
                    if probs is None:
                        return None
                    out = probs[s // stride: s // stride + n]
                    return torch.cat([out, out.new_zeros(n - out.shape[0])])
        raise RuntimeError("a long-form window was not found in the call's input_features (raw_audio needs the "
                           "windows Whisper's generate() cuts from them)")

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
        expected = self._window_frames()
        if feats.shape[-1] != expected:  # long-form input never gets here (windowed); shorter input is an error
            raise ValueError(f"input_features must hold one {expected}-frame (30 s) window per row (or more frames: "
                             f"long-form, through generate()), got {feats.shape[-1]} frames")
        b = feats.shape[0]
        raw = self._raw_audio(kwargs, b)
        x = feats.to(self.encoder.conv1.weight.dtype)
        speech = self._speech(feats, raw, needs)
        if self.runner is None:  # the output: the signals come from the last layer, which made the tokens
            with probe(self.encoder.layers[-1].self_attn, needs, None) as p:
                hidden = self.encoder(x, return_dict=True).last_hidden_state
            return self._items(hidden, p.results, speech, hidden.shape[1])
        runner = self.runner
        state = MergedTokens.start(runner.embed(x))
        start, counts = 0, None
        for j, cut in enumerate(runner.cuts):  # the signals at a cut come from layer `cut - 1`, which made them
            mask = state.attention_bias() if self.proportional_attention else None
            hidden = runner.run(state.hidden, start, cut - 1, mask)
            with probe(runner.span_attention(cut), needs, None) as p:
                hidden = runner.run(hidden, cut - 1, cut, mask)
            state = MergedTokens(hidden, state.size, state.source)
            if j == len(runner.cuts) - 1:
                break
            n = state.source.shape[1]
            counts = counts or self.step.counts(n, len(runner.cuts))  # the InEncoder's schedule
            items = self._items(hidden, p.results, _per_token(speech, state), n)
            state = state.after([self.step(it.tokens.unsqueeze(0), counts[j], it.grid,
                                           {name: t.unsqueeze(0) for name, t in it.signals.items()})
                                 for it in items])
            start = cut
        self._state = state
        items = self._items(state.hidden, p.results, _per_token(speech, state), state.source.shape[1])
        if counts is not None:  # a schedule: the last cut reaches the budget of the encoder's frames
            for i, it in enumerate(items):
                it.extra.update(k=counts[-1], source_in=state.source[i], grid_in=L.audio(state.source.shape[1]))
        return items

    def _speech(self, feats: torch.Tensor, raw: list[Any] | None, needs: frozenset[str]) -> list[torch.Tensor] | None:
        """Per encoder frame speech probability of each row (Silero on ``raw_audio``, else the log-mel energy)."""
        if "speech" not in needs:
            return None
        n = self.model.config.max_source_positions
        out = []
        for i in range(feats.shape[0]):
            speech = silero_speech(raw[i], n) if raw is not None else None
            if raw is None and self._long is not None:  # a long-form window: its slice of the recording's Silero
                speech = self._window_speech(feats[i], n)
            out.append(speech if speech is not None else energy_speech(feats[i], n))
        return out

    def _items(self, hidden: torch.Tensor, attention: dict[str, torch.Tensor], speech: list[torch.Tensor] | None,
               n_in: int) -> list[Item]:
        n = hidden.shape[1]
        items = []
        for i in range(hidden.shape[0]):
            sig = {name: t[i] for name, t in attention.items()}
            if speech is not None:
                sig["speech"] = speech[i].to(hidden.device)
            items.append(Item("audio", i, hidden[i], L.audio(n), sig, extra={"tokens_in": n_in}))
        return items

    @torch.no_grad()
    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        counts = {out.tokens.shape[1] for out in outputs}
        if len(counts) != 1:
            raise RuntimeError(f"Whisper's decoder cannot mask encoder frames, but rows were compressed to different "
                               f"counts {sorted(counts)}")
        if self.runner is None:
            hidden = torch.cat([out.tokens for out in outputs], dim=0)
            bias = self._bias_of(outputs)
        else:  # the rest of the encoder runs on the compressed frames, with proportional attention
            state = (self._state or MergedTokens.start(torch.stack([it.tokens for it in items]))).after(outputs)
            hidden = self.runner.finish(state, proportional=self.proportional_attention)
            bias = self._bias_of_sizes(state.size)
        self._install()
        self._pending = (kwargs["input_features"], hidden, bias)  # the encoder substitution hands these out
        new = dict(kwargs)
        for key in ("attention_mask", RAW_AUDIO):  # Whisper only uses the feature mask for SpecAugment/long-form
            new.pop(key, None)
        return new

    def encoder_depth(self) -> int:
        """The number of encoder layers the encoder stage runs (what ``layer="every"``/``("last", k)``/negative
        layers of ``tz.InEncoder`` resolve against)."""
        return len(self.encoder.layers)



def _self_attention(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.self_attn


def _per_token(frames: list[torch.Tensor] | None, state: MergedTokens) -> list[torch.Tensor] | None:
    """A per-frame signal (speech) as the mean over the frames each current token stands for."""
    if frames is None:
        return None
    if state.hidden.shape[1] == state.source.shape[1] and bool((state.size == 1).all()):
        return frames
    return [ops.group_mean(f.float(), state.source[i].to(f.device), state.hidden.shape[1])[0]
            for i, f in enumerate(frames)]


def _add_bias(mask: torch.Tensor | None, bias: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` plus the per-key log group sizes ``bias`` ``[B, k]`` as an additive ``[B, 1, 1, k]`` mask."""
    bias = bias[:, None, None, :].to(device=like.device, dtype=like.dtype)
    return bias if mask is None else mask + bias
