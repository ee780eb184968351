"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``): Whisper-style encoder (conv stem, 30 s window of
``max_source_positions`` frames, masked self-attention), stride-2 average pooling + layer norm, a linear projector,
and a Qwen2 LLM that reads one run of ``audio_token_id`` placeholders per clip.

Items and tokens. One item per clip (``input_features`` row), in placeholder order (clips fill the samples' runs
row-major, as the model's own ``masked_scatter`` does). A clip of ``L`` valid mel frames (``feature_attention_mask``)
gives ``n = ((L - 1) // 2 + 1 - 2) // 2 + 1`` tokens (the model's ``_get_feat_extract_output_lengths``), so clips of
different lengths have different counts; pooled frames past ``n`` are padding and never reach the LLM. The method
compresses the pooled encoder output (after ``layer_norm``, *before* the projector), layout ``[(1, n)]``. The
projector is a single affine layer, so merging before or after it gives the same LLM inputs; we compress in the
encoder's space, where the similarity-based methods (ToMe, A-ToMe, DPC-KNN) measure distances, as on Whisper.

Rebuild. Qwen2-Audio has no ``mm_encoder_outputs``-style argument (transformers 5.23): it always re-encodes
``input_features``. So the adapter removes the dropped placeholders from ``input_ids``/``attention_mask`` and passes
``inputs_embeds`` (text embeddings with the projected compressed audio tokens scattered into the kept placeholders);
``input_features``/``feature_attention_mask`` are dropped. ``input_ids`` (shortened) stays in the call: the model
ignores it when ``inputs_embeds`` is given, ``generate()`` uses it as the running sequence (so the prompt is
returned in front of the answer). ``generate()`` with ``inputs_embeds`` always uses the KV cache (transformers forces
``use_cache=True``, so ``use_cache=False`` is ignored while a pre-LLM method is active).

Stage "llm" (LLMAccess; e.g. SpeechPrune): each clip's placeholder run, sized from ``feature_attention_mask``. After
a pre-LLM method (``tz.compose``) the prefill reaches the LLM as ``inputs_embeds`` without ``input_ids`` (that is
how ``generate()`` feeds them), so ``rebuild`` records the shortened prompt and per-clip kept counts, and
``llm_items`` uses them for a prefill of exactly that shape. ``raw_audio`` is consumed only by pre-LLM methods.

Signals (per pooled token): ``cls_attention``: the attention each encoder frame receives in the last encoder layer
(mean over the clip's valid frames as queries and over heads, recomputed from that layer's q/k projections on the
clip's valid frames only, i.e. exactly the model's key-padding mask; no eager attention), summed over the two frames
each pooled token averages; ``keys``: that layer's keys (mean over heads), averaged over the two frames;
``projected``: the projector's output; ``text``/``text_mask``: the sample's text-token embeddings; ``speech``:
Silero VAD's speech probability per 40 ms token when the call carries the clips' 16 kHz waveforms as
``raw_audio=[wave, ...]`` (one per clip, a tokenzip-only keyword consumed here, as for Whisper), else the
energy-based score (:func:`tokenzip.adapters.speech.energy_speech`), each pooled token
covering 4 mel frames.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import layout as L
from ..callstate import per_call
from ..llm.adapter import LLMAccess, placeholder_items
from ..output import CompressOutput
from .attention import attention_signals
from .base import Adapter, Item, ModelParts
from .placeholders import (
    items_per_sample,
    pad_id_for,
    placeholder_keep_mask,
    require_input_ids,
    shrink_sequences,
    text_signals,
)
from .speech import RAW_AUDIO, energy_speech, raw_waveforms, silero_speech

MEL_PER_TOKEN = 4  # conv2 stride 2 x average pooling stride 2
SAMPLES_PER_TOKEN = 640  # 4 mel frames x hop 160 at 16 kHz: 40 ms per audio token


class Qwen2AudioAdapter(LLMAccess, Adapter):
    model_classes = ("Qwen2AudioForConditionalGeneration",)
    modalities = ("audio",)
    # per-call state, per thread (tokenzip/callstate.py)
    _short = per_call()
    stages = ("pre_llm", "llm")
    signals = frozenset({"cls_attention", "keys", "projected", "text", "text_mask", "speech"})

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.core = model.model
        self.audio_token_id = int(model.config.audio_token_id)
        self._short: tuple[torch.Tensor, list[int], list[int]] | None = None  # last rebuild's shortened prompt

    def parts(self) -> ModelParts:
        core = self.core
        lm = core.language_model
        return ModelParts(encoder=core.audio_tower, encoder_layers=core.audio_tower.layers,
                          projector=core.multi_modal_projector, language_model=lm, decoder_layers=lm.layers,
                          final_norm=lm.norm, embed=core.get_input_embeddings(),
                          media_token_ids={"audio": self.audio_token_id})

    def has_media(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("input_features") is not None

    def batch_size(self, kwargs: dict[str, Any]) -> int:
        return require_input_ids(kwargs).shape[0]

    # ---- clip bookkeeping ---------------------------------------------------------------------------------------
    def _features(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = kwargs["input_features"]
        if not isinstance(feats, torch.Tensor) or feats.dim() != 3:
            raise ValueError(f"input_features must be a [clips, mel, frames] tensor, got "
                             f"{getattr(feats, 'shape', type(feats))}")
        fmask = kwargs.get("feature_attention_mask")
        if fmask is None:
            raise ValueError("Qwen2-Audio needs feature_attention_mask (the processor returns it) to know each "
                             "clip's length")
        if tuple(fmask.shape) != (feats.shape[0], feats.shape[-1]):
            raise ValueError(f"feature_attention_mask must be [clips, frames] = {(feats.shape[0], feats.shape[-1])}, "
                             f"got {tuple(fmask.shape)}")
        return feats, fmask

    def clip_lengths(self, fmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per clip: valid encoder frames (after the conv stem) and tokens reaching the LLM (after pooling)."""
        frames, tokens = self.core.audio_tower._get_feat_extract_output_lengths(fmask.sum(-1).long())
        return frames, tokens

    # ---- stage "pre_llm" ----------------------------------------------------------------------------------------
    def _raw_audio(self, kwargs: dict[str, Any], clips: int) -> list[Any] | None:
        return raw_waveforms(kwargs, clips, "audio clip")

    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        from transformers.masking_utils import create_bidirectional_mask

        input_ids = require_input_ids(kwargs)
        feats, fmask = self._features(kwargs)
        tower = self.core.audio_tower
        frames, sizes = self.clip_lengths(fmask.to(feats.device))
        owner = items_per_sample(input_ids, self.audio_token_id, [int(s) for s in sizes], "audio clip")
        b, _, mel_len = feats.shape
        waves = self._raw_audio(kwargs, b)
        width = (mel_len - 2) // 2 + 1
        valid = (torch.arange(width, device=frames.device)[None, :] < frames[:, None]).long()
        dummy = torch.zeros((b, width, 1), dtype=tower.conv1.weight.dtype, device=feats.device)
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=valid)
        captured: dict[str, torch.Tensor] = {}
        attn = tower.layers[-1].self_attn

        def hook(module: torch.nn.Module, args: tuple, kw: dict) -> None:
            captured["x"] = args[0] if args else kw["hidden_states"]

        handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            hidden = tower(feats.to(tower.conv1.weight.dtype), attention_mask=mask).last_hidden_state
        finally:
            handle.remove()
        attn_needs = needs & {"cls_attention", "keys"}
        items = []
        for i in range(b):
            n, f = int(sizes[i]), int(frames[i])
            sig: dict[str, torch.Tensor] = {}
            if attn_needs:
                # the clip's valid frames only: the same attention as the model's key-padding mask gives
                rows = attention_signals(attn, captured["x"][i: i + 1, :f], attn_needs, None)
                for name, t in rows.items():
                    t = t[0, : 2 * n]
                    t = t.view(n, 2, *t.shape[1:])
                    sig[name] = t.sum(dim=1) if name == "cls_attention" else t.mean(dim=1)
            tokens = hidden[i, :n]
            if "projected" in needs:
                sig["projected"] = self.core.multi_modal_projector(tokens)
            if "text" in needs or "text_mask" in needs:
                sig.update(text_signals(self.core.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                                        {self.audio_token_id}, owner[i]))
            if "speech" in needs:
                speech = silero_speech(waves[i], n, SAMPLES_PER_TOKEN) if waves is not None else None
                if speech is None:
                    speech = energy_speech(feats[i, :, : MEL_PER_TOKEN * n], n)
                sig["speech"] = speech.to(hidden.device)
            items.append(Item("audio", owner[i], tokens, L.audio(n), sig))
        return items

    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        input_ids = kwargs["input_ids"]
        counts: list[list[tuple[int, int]]] = [[] for _ in range(input_ids.shape[0])]
        per_sample: list[list[torch.Tensor]] = [[] for _ in range(input_ids.shape[0])]
        proj = self.core.multi_modal_projector
        for item, out in zip(items, outputs):
            counts[item.sample].append((item.tokens.shape[0], out.tokens.shape[1]))
            per_sample[item.sample].append(proj(out.tokens[0]))
        keep = placeholder_keep_mask(input_ids, self.audio_token_id, counts)
        new = shrink_sequences(kwargs, keep, pad_id_for(self.model.config, {self.audio_token_id}))
        for key in ("input_features", "feature_attention_mask", "inputs_embeds", RAW_AUDIO):
            new.pop(key, None)
        ids = new["input_ids"]
        embeds = self.core.get_input_embeddings()(ids)
        slots = ids == self.audio_token_id
        audio = torch.cat([t for row in per_sample for t in row], dim=0)
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), audio.to(embeds.dtype))  # row-major == item order
        new["inputs_embeds"] = embeds
        # the shortened runs, for the LLM stage of a tz.compose pipeline (see llm_items)
        self._short = (ids, [out.tokens.shape[1] for out in outputs], [item.sample for item in items])
        return new

    # ---- stage "llm" --------------------------------------------------------------------------------------------
    def llm_items(self, kwargs: dict[str, Any]) -> list:
        """Each clip's placeholder run in the LLM sequence: sizes from ``feature_attention_mask`` or, after a
        pre-LLM method (``tz.compose``), the kept counts this adapter's ``rebuild`` recorded for the shortened
        prompt (``generate()`` hands the prefill ``inputs_embeds`` without ``input_ids``)."""
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:  # a decoding step: the model merges audio only into longer inputs
            return []
        if kwargs.get("input_features") is not None:
            input_ids = require_input_ids(kwargs)
            _, fmask = self._features(kwargs)
            sizes = [int(s) for s in self.clip_lengths(fmask)[1]]
            owners = items_per_sample(input_ids, self.audio_token_id, sizes, "audio clip")
        else:
            embeds = kwargs.get("inputs_embeds")
            short = self._short
            if embeds is None or short is None or tuple(embeds.shape[:2]) != tuple(short[0].shape):
                return []
            input_ids, sizes, owners = short
            if ids is not None and not torch.equal(ids, input_ids):
                return []
        return placeholder_items(input_ids, self.audio_token_id, sizes, owners, "audio", [L.audio(n) for n in sizes])
