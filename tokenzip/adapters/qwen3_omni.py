"""Qwen3-Omni thinker (``Qwen3OmniMoeThinkerForConditionalGeneration``; ``Qwen3OmniMoeForConditionalGeneration``
through its ``thinker``): what differs from Qwen2.5-Omni (:mod:`tokenzip.adapters.qwen2_5_omni`, whose items,
``Item.extra`` conventions, positions and rebuild it shares).

* **Audio**: a conv2d stem that downsamples 8x in time (chunks of ``2 * n_window`` mel frames give 13 tokens each),
  window attention over ``n_window_infer`` frames, no pooling: one token per encoder frame, about 12.5 tokens per
  second. ``cls_attention`` is the attention each token receives in the LAST encoder layer, recomputed from its own
  q/k over the whole clip (full, not windowed; no pairs to combine), mean over heads and the clip's queries.
* **Vision**: the Qwen3-VL ViT (no window attention, fused ``qkv``) with **deepstack**: ``get_image_features`` /
  ``get_video_features`` also return per-level features that the text model adds to the visual tokens after its
  first decoder layers. A compressed item's deepstack rows follow its tokens: a kept token keeps its own rows, a
  merged token gets the mean of its members' rows (``CompressOutput.source``; uniform, where the method may weight
  the tokens themselves: :func:`tokenzip.adapters.merge_unit_vit.cut_rows`, as on Qwen3-VL). ``cls_attention`` /
  ``keys`` from the last block as for Qwen2-VL (:class:`tokenzip.adapters.qwen2_vl._LastBlockProbe`), averaged over
  each 2x2 merge group, divided by the patches of the image / frame.
* **Positions** are floats (``get_rope_index`` builds float TMRoPE ids; ``position_id_per_seconds`` may be
  fractional) and, with ``use_audio_in_video``, video and audio tokens are interleaved one by one by time (the
  processor puts each video grid at its start time among the audio tokens); the ids are still gathered from the
  model's own ``get_rope_index`` on the full sequence.
* **Rebuild**: ``inputs_embeds`` (text + audio tokens at their kept slots, as for Qwen2.5-Omni; the kept image/video
  slots keep their placeholder embeddings) and ``mm_encoder_outputs`` with the kept visual tokens and their deepstack
  rows, which the model scatters at those slots (found from ``input_ids``, or at generate()'s prefill, which gets
  no ``input_ids``, by comparing embeddings with the placeholders') and uses for ``visual_pos_masks``.

Stage "encoder" (audio tower, :mod:`tokenzip.adapters.omni_audio_tower`, as Qwen2.5-Omni's): the layers take the
same call (``layer(hidden [frames, D], cu_seqlens, max_seqlen=...)``, window attention over ``n_window_infer`` mel
frames' worth of encoder frames, no mask), so the same stage drives them; what differs is declared here: the unit is
one encoder frame (``audio_unit = 1``: no pooling, every frame is one LLM token, none is left over) and the tail is
``ln_post``, ``proj1``, ``act``, ``proj2``. The conv2d stem runs per chunk before the first layer, untouched.

Stage "llm" (as Qwen2.5-Omni's: each item's placeholder columns, or after a pre-LLM method the kept columns this
adapter's ``rebuild`` recorded): DeepStack follows the shortened sequence inside the LLM
(:class:`tokenzip.adapters.deepstack.DeepstackFollower`, shared with Qwen3-VL): after a stage at decoder layer ``K``
a level added after a later layer goes only to the visual tokens still present, each its own row. The decoder's
sparse MoE blocks route each token on its own, so the removed tokens change nothing for the kept ones but the
attention they no longer receive.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import BaseModelOutputWithDeepstackFeatures

from ..callstate import per_call
from ..output import CompressOutput
from .attention import ATTENTION_SIGNALS, attention_signals
from .base import Item
from .deepstack import DeepstackFollower
from .merge_unit_vit import cut_rows
from .qwen2_5_omni import Qwen2_5OmniAdapter
from .speech import energy_speech, raw_waveforms, silero_speech


class Qwen3OmniAdapter(Qwen2_5OmniAdapter):
    model_classes = ("Qwen3OmniMoeThinkerForConditionalGeneration", "Qwen3OmniMoeForConditionalGeneration")
    # per-call state, per thread (tokenzip/callstate.py)
    _deepstack = per_call(factory=dict)
    stages = ("pre_llm", "encoder", "llm")
    audio_unit = 1  # stage "encoder": no pooling, one encoder frame per LLM token
    # the kept visual slots keep their placeholder embeddings: generate() hands the prefill inputs_embeds without
    # input_ids, and the model then finds the slots for mm_encoder_outputs by comparing embeddings with the
    # placeholder's
    visual_in_embeds = False
    # stage "input" (frames): the normalisation of the Qwen3-VL video processor (ImageNet-standard 0.5 mean/std), the
    # ViT Qwen3-Omni shares; the published Qwen3-Omni preprocessor config was not checked here (only the frames a
    # frame selector sees depend on it, not the call it builds)
    video_pixel_mean: tuple[float, float, float] = tuple(IMAGENET_STANDARD_MEAN)
    video_pixel_std: tuple[float, float, float] = tuple(IMAGENET_STANDARD_STD)

    def _audio_token_counts(self, mel_frames: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

        return _get_feat_extract_output_lengths(mel_frames)

    def _encode_audio(self, kwargs: dict[str, Any], needs: frozenset[str]
                      ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        feats, fmask = self._audio_args(kwargs)
        tower = self.core.audio_tower
        sizes = [int(n) for n in self._audio_token_counts(fmask.sum(-1).long()).tolist()]
        waves = raw_waveforms(kwargs, feats.shape[0], "audio clip")
        attn_needs = needs & ATTENTION_SIGNALS
        out, last_in = self._run_audio_tower(feats, fmask, attn_needs)
        tokens = list(out.split(sizes))
        per_clip: list[dict[str, torch.Tensor]] = []
        start = 0
        for i, n in enumerate(sizes):
            sig: dict[str, torch.Tensor] = {}
            if attn_needs:  # one encoder frame per token: the clip's frames as one full sequence
                rows = attention_signals(tower.layers[-1].self_attn, last_in[None, start: start + n],
                                         attn_needs, None)
                sig.update({name: t[0] for name, t in rows.items()})
            if "speech" in needs:
                sig["speech"] = self._clip_speech(feats[i], int(fmask[i].sum()),
                                                  None if waves is None else waves[i], n).to(out.device)
            per_clip.append(sig)
            start += n
        return tokens, per_clip

    def _clip_speech(self, feats: torch.Tensor, mel: int, wave: Any, n: int) -> torch.Tensor:
        # a token covers mel / n frames (about 8: 80 ms), 160 samples per frame
        speech = silero_speech(wave, n, max(1, round(mel * 160 / n))) if wave is not None else None
        return energy_speech(feats[:, : max(1, mel // n) * n], n) if speech is None else speech

    # ---- stage "encoder" (audio tower; adapters/omni_audio_tower.py): one frame per token, its own tail ----------
    def _audio_frames(self, mel: torch.Tensor) -> torch.Tensor:
        return self._audio_token_counts(mel)

    def _audio_unit_starts(self, mel: torch.Tensor, frames: int) -> torch.Tensor:
        return torch.arange(frames)

    def _audio_tail(self, frames: torch.Tensor) -> torch.Tensor:
        tower = self.core.audio_tower
        return tower.proj2(tower.act(tower.proj1(tower.ln_post(frames[:, 0]))))

    def _merged_order(self, grid: torch.Tensor) -> torch.Tensor | None:
        return None  # no window attention: the blocks run in raster order

    def _keep_vision_outputs(self, modality: str, out: Any) -> None:
        self._deepstack[modality] = [list(level) for level in out.deepstack_features]

    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        self._deepstack: dict[str, list[list[torch.Tensor]]] = {}
        items = super().encode(kwargs, needs)
        counters: dict[str, int] = {}
        by_source = sorted(range(len(items)), key=lambda i: (items[i].modality, items[i].sample,
                                                                int(items[i].extra["slots"][0])))
        for i in by_source:  # the j-th image / video in placeholder order over the batch is the model's j-th
            it = items[i]
            if it.modality in self._deepstack:
                j = counters.get(it.modality, 0)
                it.extra["deepstack"] = [level[j] for level in self._deepstack[it.modality]]
                counters[it.modality] = j + 1
        self._deepstack = {}
        return items

    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        new = super().rebuild(kwargs, items, outputs)
        encoded: dict[str, Any] = {}
        for modality in ("image", "video"):
            tokens, levels = [], None
            for item, out in zip(items, outputs):
                if item.modality != modality:
                    continue
                order = torch.argsort(out.index[0])
                tokens.append(out.tokens[0][order.to(out.tokens.device)])
                rows = [cut_rows(d, out)[order.to(d.device)] for d in item.extra["deepstack"]]
                levels = [[r] for r in rows] if levels is None else [lv + [r] for lv, r in zip(levels, rows)]
            if tokens:
                encoded[modality] = BaseModelOutputWithDeepstackFeatures(
                    pooler_output=tuple(tokens), deepstack_features=[tuple(lv) for lv in levels])
        if encoded:
            new["mm_encoder_outputs"] = encoded
        return new

    # ---- stage "llm" --------------------------------------------------------------------------------------------
    def llm_runner_hooks(self, runner: Any) -> list[Any]:
        """Called by the LLM-stage runner when it installs: DeepStack follows the runner's shortened sequence
        (module doc). Returns handles the runner removes with its own."""
        return [DeepstackFollower(self.text_model, runner)]
