"""Tiny random-weight instances of the real transformers classes, and inputs for them.

Used by the test-suite and the ``tiny`` bench preset. Each ``Case`` knows how to build its model with a given
attention implementation and how to make a (padded) batch of samples with media."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .adapters import LlavaAdapter, LlavaOnevisionAdapter, Qwen2AudioAdapter, Qwen2VLAdapter, WhisperAdapter
from .adapters.base import Adapter
from .compat import omni_thinker_parts

IMAGE_TOKEN = 100
PAD = 0
VOCAB = 128


@dataclass
class Sample:
    """One prompt: text token ids around ``n_items`` media items, and a seed for its media."""

    before: list[int]
    n_items: int
    after: list[int]
    seed: int


def default_samples() -> list[Sample]:
    return [
        Sample([1, 5, 6, 7], 1, [8, 9, 10, 11, 12], seed=1),
        Sample([1, 13], 2, [14, 15, 16], seed=2),
        Sample([1, 17, 18, 19, 20, 21, 22], 1, [23], seed=3),
    ]


@dataclass
class Case:
    """One model adapter's test case: a tiny random-weight config of the real class and inputs for it.

    Always needed: ``build``, ``make_inputs`` and ``adapter`` (the adapter class the model gets: its ``modalities``,
    ``stages`` and ``signals`` decide, at collection time and without building a model, which methods the invariant
    suite runs on the case). The language model whose input the invariants check comes from the adapter
    (``adapter_for(model).parts().language_model``). The hooks below are needed only when the defaults do not
    describe the model:

    - ``position_ids``: the model does not use left-padded 1-D positions ``cumsum(attention_mask) - 1`` (Qwen-VL's
      3-D M-RoPE ids), or is an encoder-decoder (then it returns a dict, e.g. ``decoder_position_ids``).
    - ``lm_tokens``: the language model does not read the media through its ``attention_mask`` (Whisper's decoder
      reads them as ``encoder_hidden_states``): its forward kwargs -> a ``[B, L]`` mask of what it reads.
    - ``input_tokens``: the uncompressed count is not ``attention_mask.sum(1)`` (Whisper: encoder frames).
    - ``generate_inputs``: ``generate()`` takes other arguments than the forward inputs (Whisper: only
      ``input_features``); by default the inputs' ``input_ids`` must prefix the output.
    - ``media``: the modalities ``make_inputs`` carries, when fewer than the adapter's (LLaVA-OneVision takes images
      and videos; its image case carries images only, its video case clips only): a method runs on the case only if
      it compresses one of them, so every item of the inputs is compressed by every method paired with the case.
    - ``only_stages``: the stages the inputs support, when fewer than the adapter's (LLaVA-OneVision clips: before
      and inside the LLM, not in the encoder).
    """

    name: str
    build: Callable[[str], torch.nn.Module]  # attn_implementation -> model (eval, seeded)
    make_inputs: Callable[[torch.nn.Module, list[Sample]], dict[str, Any]]  # left-padded batch
    adapter: type[Adapter]
    position_ids: Callable[[torch.nn.Module, dict[str, Any]], Any] | None = None
    lm_tokens: Callable[[dict[str, Any]], torch.Tensor] | None = None
    input_tokens: Callable[[dict[str, Any]], torch.Tensor] | None = None
    generate_inputs: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    media: tuple[str, ...] | None = None
    only_stages: tuple[str, ...] | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in self.adapter.modalities if self.media is None or m in self.media)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s for s in self.adapter.stages if self.only_stages is None or s in self.only_stages)

    def produces(self, stage: str) -> frozenset[str]:
        """The signals a method at ``stage`` can get on this case's model."""
        return self.adapter.produces(stage)


def left_pad(rows: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _llama_text_config(**kw: Any):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **kw)


def tiny_llava(attn_implementation: str = "sdpa", seed: int = 0, **vision_config: Any) -> torch.nn.Module:
    """``vision_config`` overrides CLIPVisionConfig fields (e.g. ``num_hidden_layers``)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    for name, value in vision_config.items():
        setattr(vision, name, value)
    cfg = LlavaConfig(vision_config=vision, text_config=_llama_text_config(), image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=PAD)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def llava_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    size = model.config.vision_config.image_size
    n = (size // model.config.vision_config.patch_size) ** 2
    rows, pixels = [], []
    for s in samples:
        rows.append(s.before + [IMAGE_TOKEN] * (n * s.n_items) + s.after)
        g = torch.Generator().manual_seed(s.seed)
        pixels.append(torch.randn(s.n_items, 3, size, size, generator=g))
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels)}




# ---- LLaVA-OneVision ---------------------------------------------------------------------------------------------
ONEVISION_VIDEO_TOKEN = 101
ONEVISION_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
# (height, width) of the test images; 112x84 exercises the unpadding of the crop grid
ONEVISION_SIZES = [(56, 112), (112, 112), (112, 56), (112, 84)]


def tiny_llava_onevision(attn_implementation: str = "sdpa", seed: int = 0, **config: Any) -> torch.nn.Module:
    """SigLIP (56-px crops of 4x4 patches, no CLS) + Qwen2, AnyRes pinpoints up to 112x112, random weights.
    ``config`` overrides LlavaOnevisionConfig fields (e.g. ``vision_aspect_ratio``)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=56, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    kw: dict[str, Any] = dict(image_token_index=IMAGE_TOKEN, video_token_index=ONEVISION_VIDEO_TOKEN,
                              image_grid_pinpoints=ONEVISION_PINPOINTS, pad_token_id=PAD)
    kw.update(config)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, **kw)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def onevision_images(samples: list[Sample]) -> list[list[Any]]:
    """Random RGB PIL images per sample; image ``j`` of a sample with seed ``s`` has size
    ``ONEVISION_SIZES[(s + j) % 4]``, so sizes (and token counts) differ across samples."""
    from PIL import Image

    out = []
    for s in samples:
        g = torch.Generator().manual_seed(s.seed)
        imgs = []
        for j in range(s.n_items):
            h, w = ONEVISION_SIZES[(s.seed + j) % len(ONEVISION_SIZES)]
            imgs.append(Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()))
        out.append(imgs)
    return out


def onevision_image_processor(model: torch.nn.Module):
    """The real (PIL-backend) LLaVA-OneVision image processor, sized for ``model``."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    side = model.config.vision_config.image_size
    return LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                           image_grid_pinpoints=model.config.image_grid_pinpoints)


def llava_onevision_inputs(model: torch.nn.Module, samples: list[Sample], *,
                           batch_num_images: bool = True) -> dict[str, Any]:
    """A left-padded batch as LlavaOnevisionProcessor would build it: real image-processor outputs (5-D
    ``pixel_values``, ``image_sizes``, ``batch_num_images``; samples with several images are not tiled, as in the
    processor), and as many placeholders per image as the model's own ``get_image_features`` returns features.
    ``batch_num_images=False`` leaves it out, so that every image is tiled (the model's single-image default)."""
    px = onevision_image_processor(model)(onevision_images(samples), return_tensors="pt")
    nums = px["batch_num_images"] if batch_num_images else None
    with torch.no_grad():
        feats = model.model.get_image_features(px["pixel_values"], px["image_sizes"], batch_num_images=nums,
                                               return_dict=True).pooler_output
    counts = iter(int(f.shape[0]) for f in feats)
    rows = []
    for s in samples:
        placeholders = [IMAGE_TOKEN] * sum(next(counts) for _ in range(s.n_items))
        rows.append(s.before + placeholders + s.after)
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": px["pixel_values"],
           "image_sizes": px["image_sizes"]}
    if batch_num_images:
        out["batch_num_images"] = px["batch_num_images"]
    return out


ONEVISION_FRAMES = 6  # frames per test clip: 6 x (4 x 4) pooled tokens + 1 newline = 97 tokens on the tiny model
ONEVISION_FRAME_SIZE = 98  # 7 x 7 patches of 14 px, pooled to 4 x 4: an odd grid, like 384 px (27 x 27 -> 14 x 14)


def tiny_llava_onevision_video(attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """The video case's model: as :func:`tiny_llava_onevision`, with 98-px SigLIP frames (7 x 7 patches, pooled by
    the model to 4 x 4 tokens per frame)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=ONEVISION_FRAME_SIZE, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                               video_token_index=ONEVISION_VIDEO_TOKEN, pad_token_id=PAD)
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation).eval()


def llava_onevision_video_inputs(model: torch.nn.Module, samples: list[Sample], *,
                                 frames: int = ONEVISION_FRAMES) -> dict[str, Any]:
    """A left-padded batch of video prompts: each of a sample's ``n_items`` clips is a synthetic clip
    (``tokenzip.video.synthetic_clip``, 48x64 px, seed ``10 * sample seed + j``) preprocessed as
    LlavaOnevisionVideoProcessor would (``onevision_video_pixels``, sized for ``model``), with ``frames * g * g + 1``
    ``<video>`` placeholders per clip, as the processor expands them."""
    from .video import onevision_video_pixels, onevision_video_processor, onevision_video_tokens, synthetic_clip

    clips = [synthetic_clip(frames, 48, 64, seed=10 * s.seed + j).frames for s in samples for j in range(s.n_items)]
    pixels = onevision_video_pixels(clips, onevision_video_processor(model.config.vision_config.image_size))
    per_clip = onevision_video_tokens(model.config, frames)
    rows = [s.before + [ONEVISION_VIDEO_TOKEN] * (per_clip * s.n_items) + s.after for s in samples]
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixels}


# ---- Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------------------------
QWEN_VIDEO_TOKEN, QWEN_VISION_START, QWEN_VISION_END = 101, 102, 103
# (h, w) patch grids of the test images (multiples of the 2x2 merge): 12, 4, 12, 8, 9 LLM tokens
QWEN_GRIDS = [(6, 8), (4, 4), (8, 6), (4, 8), (6, 6)]


def _qwen_vl_text_config() -> dict[str, Any]:
    # head_dim 8: the M-RoPE sections (t, h, w) must sum to head_dim / 2; initializer_range 0.1 (not 0.02) so that
    # attention is far from uniform and a wrong position changes the logits visibly
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})


def _qwen_vl_token_ids() -> dict[str, int]:
    return dict(image_token_id=IMAGE_TOKEN, video_token_id=QWEN_VIDEO_TOKEN, vision_start_token_id=QWEN_VISION_START,
                vision_end_token_id=QWEN_VISION_END)


def tiny_qwen2_vl(attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """Qwen2-VL: 2-block ViT (4-px patches, 2x2 merger) + 2-layer M-RoPE LLM, random weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2)
    cfg = Qwen2VLConfig(vision_config=vision, text_config=_qwen_vl_text_config(), **_qwen_vl_token_ids())
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation).eval()


def tiny_qwen2_5_vl(attn_implementation: str = "sdpa", seed: int = 0, **vision_config: Any) -> torch.nn.Module:
    """Qwen2.5-VL: 3-block ViT with window attention (windows of 2x2 merged tokens; block 1 full attention, the LAST
    block windowed, to exercise the windowed signal path) + 2-layer M-RoPE LLM, random weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision: dict[str, Any] = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                                  temporal_patch_size=2, spatial_merge_size=2, window_size=16, out_hidden_size=32,
                                  fullatt_block_indexes=[1])
    vision.update(vision_config)
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_vl_text_config(), **_qwen_vl_token_ids())
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation).eval()


def qwen_vl_inputs(model: torch.nn.Module, samples: list[Sample],
                   markers: tuple[int, int] = (QWEN_VISION_START, QWEN_VISION_END)) -> dict[str, Any]:
    """A left-padded batch as the Qwen-VL processor builds it: flattened patches ``[sum(t*h*w), C*T*P*P]``,
    ``image_grid_thw``, ``<vision_start> <image>*(t*h*w/4) <vision_end>`` per image (``markers``: the start/end
    tokens around each image's placeholders) and ``mm_token_type_ids`` (1 at image placeholders). Image ``j`` of a
    sample with seed ``s`` has grid ``QWEN_GRIDS[(s + j) % 5]``."""
    v = model.config.vision_config
    unit = v.spatial_merge_size ** 2
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    rows, pixels, grids = [], [], []
    for s in samples:
        g = torch.Generator().manual_seed(s.seed)
        row = list(s.before)
        for j in range(s.n_items):
            h, w = QWEN_GRIDS[(s.seed + j) % len(QWEN_GRIDS)]
            grids.append([1, h, w])
            pixels.append(torch.randn(h * w, patch_dim, generator=g))
            row += [markers[0]] + [IMAGE_TOKEN] * (h * w // unit) + [markers[1]]
        rows.append(row + s.after)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
            "pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


def qwen_vl_positions(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """``[4, B, L]`` position ids as ``generate()`` builds them for Qwen-VL: row 0 the 1-D text positions (for the
    causal mask), rows 1-3 the model's own 3-D M-RoPE positions (``get_rope_index``)."""
    mask = inputs["attention_mask"]
    rope, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0).to(rope.dtype)
    return torch.cat([text.unsqueeze(0), rope], dim=0)


# ---- Whisper -------------------------------------------------------------------------------------------------------
WHISPER_START = 3  # decoder_start_token_id of the tiny config
WHISPER_FRAMES = 40  # encoder frames (max_source_positions); input features are twice as long


def tiny_whisper(attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """Whisper with 16 mel bins, 40 encoder frames, 2+2 layers of width 32, random weights, short-form generation."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=WHISPER_FRAMES, max_target_positions=64, pad_token_id=PAD,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=WHISPER_START, suppress_tokens=None,
                        begin_suppress_tokens=None)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    model.generation_config = GenerationConfig(decoder_start_token_id=WHISPER_START, bos_token_id=1, eos_token_id=2,
                                               pad_token_id=PAD, no_timestamps_token_id=4, is_multilingual=False)
    return model.eval()


def whisper_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    """One clip per sample: random log-mel-like features whose tail is a quiet stretch (so VAD methods see both
    speech and silence), and the sample's text as a left-padded decoder prompt after the start token."""
    mel = model.config.num_mel_bins
    frames = 2 * model.config.max_source_positions
    feats, rows = [], []
    for s in samples:
        g = torch.Generator().manual_seed(s.seed)
        f = torch.randn(mel, frames, generator=g) * 0.3 + 0.5
        quiet = frames // 4 + 2 * s.seed  # a different silent tail per sample
        f[:, frames - quiet:] = -0.5
        feats.append(f)
        rows.append([WHISPER_START] + s.before + s.after)
    ids, mask = left_pad(rows)
    return {"input_features": torch.stack(feats), "decoder_input_ids": ids, "decoder_attention_mask": mask}


def whisper_positions(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    mask = inputs["decoder_attention_mask"]
    return {"decoder_position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}


# ---- Qwen2-Audio ---------------------------------------------------------------------------------------------------
QWEN_AUDIO_TOKEN = 102
QWEN_AUDIO_BOS, QWEN_AUDIO_EOS = 103, 104
QWEN_AUDIO_FRAMES = 40  # encoder frames (max_source_positions): 80 mel frames, at most 20 tokens per clip
# valid mel frames of the test clips (cycled): 80, 50, 64, 36, 44 mel frames give 20, 12, 16, 9, 11 audio tokens
QWEN_AUDIO_LENGTHS = [36, 80, 50, 64, 44]


def tiny_qwen2_audio(attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """Qwen2-Audio: 16 mel bins, 40 encoder frames (2 layers, width 32), stride-2 pooling, Qwen2 (3 layers, width
    32), random weights."""
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2Config,
    )

    audio = Qwen2AudioEncoderConfig(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                                    encoder_ffn_dim=64, max_source_positions=QWEN_AUDIO_FRAMES)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    cfg = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=QWEN_AUDIO_TOKEN)
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def qwen2_audio_clip_tokens(mel_frames: int) -> int:
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def qwen2_audio_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    """Per clip: random log-mel-like features of a length from ``QWEN_AUDIO_LENGTHS`` (so token counts differ
    across clips) with a quiet stretch at the end of the valid part, padded to the 30 s window; the prompt holds
    ``<bos> AUDIO * n <eos>`` per clip, as the processor expands it. Left-padded batch."""
    mel = model.config.audio_config.num_mel_bins
    frames = 2 * model.config.audio_config.max_source_positions
    rows, feats, fmasks = [], [], []
    for s in samples:
        row = list(s.before)
        for j in range(s.n_items):
            g = torch.Generator().manual_seed(100 * s.seed + j)
            length = QWEN_AUDIO_LENGTHS[(s.seed + j) % len(QWEN_AUDIO_LENGTHS)]
            f = torch.full((mel, frames), -0.5)
            f[:, :length] = torch.randn(mel, length, generator=g) * 0.3 + 0.5
            f[:, length - length // 4: length] = -0.4  # quiet tail
            m = torch.zeros(frames, dtype=torch.long)
            m[:length] = 1
            feats.append(f)
            fmasks.append(m)
            row += [QWEN_AUDIO_BOS] + [QWEN_AUDIO_TOKEN] * qwen2_audio_clip_tokens(length) + [QWEN_AUDIO_EOS]
        rows.append(row + s.after)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "input_features": torch.stack(feats),
            "feature_attention_mask": torch.stack(fmasks)}



# ---- Qwen2-VL / Qwen2.5-VL video -----------------------------------------------------------------------------------
# frames of the test clips (cycled over a sample's clips by seed): 3, 4, 5, 6 frames give t = 2, 2, 3, 3 temporal
# grids (odd counts repeat the last frame), so a batch holds clips of different lengths
QWEN_CLIP_FRAMES = [3, 4, 5, 6]
QWEN_CLIP_SIZE = (30, 40)  # (height, width): smart_resize makes it 32 x 40 px, 8 x 10 patches, 4 x 5 tokens per grid
QWEN_CLIP_FPS = [3.0, 2.0]  # Qwen2.5-VL: second_per_grid_ts = 2 / fps = 2/3 and 1 (cycled like the frames)


def qwen_clip_settings(model: torch.nn.Module):
    """The video processor's settings for the tiny Qwen-VL models (4-px patches: 8-px resize factor)."""
    from .video import QwenVideoSettings

    return QwenVideoSettings.for_model(model, min_pixels=8 * 8, max_pixels=48 * 48)


def qwen_vl_video_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    """A left-padded batch of video prompts as the Qwen-VL processor builds it: clip ``j`` of a sample with seed
    ``s`` is ``synthetic_clip`` of ``QWEN_CLIP_FRAMES[(s + j) % 4]`` frames (``QWEN_CLIP_SIZE``, seed ``10 s + j``)
    preprocessed by :func:`tokenzip.video.qwen_video_pixels`, in ``<vision_start> <video>*(t*h*w/4) <vision_end>``;
    ``mm_token_type_ids`` 2 at video placeholders; on Qwen2.5-VL ``second_per_grid_ts`` from ``QWEN_CLIP_FPS``."""
    from .video import qwen_video_pixels, qwen_video_tokens, synthetic_clip

    settings = qwen_clip_settings(model)
    clips, rates, owners = [], [], []
    for b, s in enumerate(samples):
        for j in range(s.n_items):
            k = (s.seed + j) % len(QWEN_CLIP_FRAMES)
            clips.append(synthetic_clip(QWEN_CLIP_FRAMES[k], *QWEN_CLIP_SIZE, seed=10 * s.seed + j).frames)
            rates.append(QWEN_CLIP_FPS[k % len(QWEN_CLIP_FPS)])
            owners.append(b)
    pixels, grid = qwen_video_pixels(clips, settings)
    counts = iter(qwen_video_tokens(grid, settings.merge_size))
    rows = []
    for b, s in enumerate(samples):
        row = list(s.before)
        for _ in range(owners.count(b)):
            row += [QWEN_VISION_START] + [QWEN_VIDEO_TOKEN] * next(counts) + [QWEN_VISION_END]
        rows.append(row + s.after)
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": 2 * (ids == QWEN_VIDEO_TOKEN).int(),
           "pixel_values_videos": pixels, "video_grid_thw": grid}
    if type(model).__name__.startswith("Qwen2_5_VL"):
        out["second_per_grid_ts"] = torch.tensor([settings.temporal_patch_size / r for r in rates])
    return out


def qwen_vl_media_positions(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """:func:`qwen_vl_positions` for calls with images and/or clips: ``[4, B, L]``, rows 1-3 from the model's own
    ``get_rope_index`` with both grids and ``second_per_grid_ts``."""
    mask = inputs["attention_mask"]
    extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    rope, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs.get("image_grid_thw"),
                                         video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask, **extra)
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0).to(rope.dtype)
    return torch.cat([text.unsqueeze(0), rope], dim=0)

# ---- the registry of test cases: one entry per model adapter (the invariant suite runs every method on each) -----
CASES: dict[str, Case] = {
    "llava": Case("llava", tiny_llava, llava_inputs, LlavaAdapter),
    "llava_onevision": Case("llava_onevision", lambda attn: tiny_llava_onevision(attn), lambda m, s:
                            llava_onevision_inputs(m, s), LlavaOnevisionAdapter, media=("image",)),
    "qwen2_vl": Case("qwen2_vl", lambda attn: tiny_qwen2_vl(attn), lambda m, s: qwen_vl_inputs(m, s), Qwen2VLAdapter,
                     position_ids=lambda m, i: qwen_vl_positions(m, i), media=("image",)),
    "qwen2_5_vl": Case("qwen2_5_vl", lambda attn: tiny_qwen2_5_vl(attn), lambda m, s: qwen_vl_inputs(m, s),
                       Qwen2VLAdapter,
                       position_ids=lambda m, i: qwen_vl_positions(m, i), media=("image",)),
    "whisper": Case("whisper", lambda attn: tiny_whisper(attn), lambda m, s: whisper_inputs(m, s), WhisperAdapter,
                    position_ids=lambda m, i: whisper_positions(i),
                    lm_tokens=lambda kw: torch.ones(kw["encoder_hidden_states"].shape[:2], dtype=torch.long),
                    input_tokens=lambda i: torch.full((i["input_features"].shape[0],),
                                                      i["input_features"].shape[-1] // 2),
                    generate_inputs=lambda i: {"input_features": i["input_features"]}),
    "qwen2_audio": Case("qwen2_audio", lambda attn: tiny_qwen2_audio(attn), lambda m, s: qwen2_audio_inputs(m, s),
                        Qwen2AudioAdapter),
    # clips only, before and inside the LLM (adapters/onevision_video.py); every clip of a batch has ONEVISION_FRAMES
    # frames
    "llava_onevision_video": Case("llava_onevision_video", lambda attn: tiny_llava_onevision_video(attn),
                                  lambda m, s: llava_onevision_video_inputs(m, s), LlavaOnevisionAdapter,
                                  media=("video",), only_stages=("pre_llm", "llm")),
    # clips only, of different lengths in one batch, before, inside and in the LLM (adapters/qwen_video.py)
    "qwen2_vl_video": Case("qwen2_vl_video", lambda attn: tiny_qwen2_vl(attn), lambda m, s: qwen_vl_video_inputs(m, s),
                           Qwen2VLAdapter, position_ids=lambda m, i: qwen_vl_media_positions(m, i), media=("video",)),
    "qwen2_5_vl_video": Case("qwen2_5_vl_video", lambda attn: tiny_qwen2_5_vl(attn),
                             lambda m, s: qwen_vl_video_inputs(m, s), Qwen2VLAdapter,
                             position_ids=lambda m, i: qwen_vl_media_positions(m, i), media=("video",)),
}


# ---- Qwen3-VL (images, videos, DeepStack) ---------------------------------------------------------------------------
from .adapters.qwen3_vl import Qwen3VLAdapter  # noqa: E402  (appended section: the registry above stays untouched)

# frames and (height, width) in pixels of the test clips, cycled by sample seed + clip index: 2, 3 and 2 temporal
# grids (5 frames: the last one is repeated, as the processor does) of 6, 4 and 6 tokens
QWEN3_VL_CLIPS = [(4, (16, 24)), (6, (16, 16)), (5, (24, 16))]


def tiny_qwen3_vl(attn_implementation: str = "sdpa", seed: int = 0, text_layers: int = 3,
                  deepstack: tuple[int, ...] = (0, 1, 2), moe: bool = False) -> torch.nn.Module:
    """Qwen3-VL: 3-block ViT (4-px patches, 2x2 merger, DeepStack mergers after blocks ``deepstack``, so levels are
    added after decoder layers 0 ... len - 1) + ``text_layers``-layer M-RoPE LLM (interleaved sections, q/k norms),
    random weights. ``moe``: the Qwen3-VL-MoE class (2 experts, top-1)."""
    import transformers

    text: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                                pad_token_id=PAD, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=16,
                  deepstack_visual_indexes=list(deepstack))
    if moe:
        text.update(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, decoder_sparse_step=1)
    prefix = "Qwen3VLMoe" if moe else "Qwen3VL"
    cfg = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision, **_qwen_vl_token_ids())
    torch.manual_seed(seed)
    cls = getattr(transformers, f"{prefix}ForConditionalGeneration")
    return cls._from_config(cfg, attn_implementation=attn_implementation).eval()


def qwen3_vl_image_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    """As :func:`qwen_vl_inputs` (Qwen3-VL's image prompt is Qwen2-VL's), with ``mm_token_type_ids`` 1 at images."""
    return qwen_vl_inputs(model, samples)


def _timestamp_ids(seconds: float) -> list[int]:
    """Text token ids for ``<x.x seconds>`` in the tiny vocabulary: one id per digit (40-49), ``.`` (50) and
    ``seconds>`` (51), after ``<`` (52): the prompt's timestamp is text of its own length."""
    return [52] + [50 if ch == "." else 40 + int(ch) for ch in f"{seconds:.1f}"] + [51]


def qwen3_vl_video_inputs(model: torch.nn.Module, samples: list[Sample], *, outer_pair: bool = True,
                          grids: list[list[int]] | None = None) -> dict[str, Any]:
    """A left-padded batch of video prompts as ``Qwen3VLProcessor`` lays them out: clip ``j`` of a sample with seed
    ``s`` is a synthetic clip (``tokenzip.video.synthetic_clip``, 2 fps) of ``QWEN3_VL_CLIPS[(s + j) % 3]`` frames and
    size, preprocessed by :func:`tokenzip.video.qwen3_vl_video_pixels`; in the prompt, inside the template's
    ``<vision_start> ... <vision_end>`` (``outer_pair=False``: without it, as the 5.25 processor collapses it), each
    temporal grid is its timestamp text, ``<vision_start>``, its placeholders and ``<vision_end>``.
    ``mm_token_type_ids`` is 2 at video placeholders. ``grids``: per clip (in batch order), the temporal grids to
    keep (their frames, timestamps and blocks only: the clip the processor would give for those frames)."""
    import numpy as np

    from .video import qwen3_vl_video_pixels, qwen3_vl_video_processor, synthetic_clip

    v = model.config.vision_config
    proc = qwen3_vl_video_processor(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                    temporal_patch_size=v.temporal_patch_size)
    unit = v.spatial_merge_size ** 2
    rows, pixels, grid_rows = [], [], []
    tp = v.temporal_patch_size
    clip_index = 0
    for s in samples:
        row = list(s.before)
        for j in range(s.n_items):
            frames, size = QWEN3_VL_CLIPS[(s.seed + j) % len(QWEN3_VL_CLIPS)]
            clip = synthetic_clip(max(frames, 3), 32, 32, seed=10 * s.seed + j)
            pick = clip.frames[:frames]
            pick = np.concatenate([pick, pick[-1:].repeat(-len(pick) % tp, axis=0)])  # the processor's padding
            keep = list(range(len(pick) // tp)) if grids is None else list(grids[clip_index])
            clip_index += 1
            kept_frames = pick.reshape(-1, tp, *pick.shape[1:])[keep].reshape(-1, *pick.shape[1:])
            px, grid = qwen3_vl_video_pixels([kept_frames], proc, size=size)
            _, h, w = grid[0].tolist()
            times = clip.timestamps[:frames].tolist()
            times += [times[-1]] * (-len(times) % tp)
            if outer_pair:
                row.append(QWEN_VISION_START)
            for g in keep:
                first, last = times[g * tp], times[(g + 1) * tp - 1]
                row += _timestamp_ids((first + last) / 2)
                row += [QWEN_VISION_START] + [QWEN_VIDEO_TOKEN] * (h * w // unit) + [QWEN_VISION_END]
            if outer_pair:
                row.append(QWEN_VISION_END)
            pixels.append(px)
            grid_rows.append(grid)
        rows.append(row + s.after)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == QWEN_VIDEO_TOKEN).int() * 2,
            "pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.cat(grid_rows)}


def qwen3_vl_positions(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """``[4, B, L]`` position ids as ``generate()`` builds them for Qwen3-VL (images and/or videos)."""
    mask = inputs["attention_mask"]
    rope, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs.get("image_grid_thw"),
                                         video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask)
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0).to(rope.dtype)
    return torch.cat([text.unsqueeze(0), rope], dim=0)


# ---- Qwen2.5-Omni thinker ----------------------------------------------------------------------------------------
from .adapters.qwen2_5_omni import Qwen2_5OmniAdapter  # noqa: E402  (appended section: merge-friendly)

OMNI_IMAGE, OMNI_VIDEO, OMNI_VISION_START, OMNI_VISION_END = 100, 101, 102, 103
OMNI_AUDIO, OMNI_AUDIO_START, OMNI_AUDIO_END = 104, 105, 106
OMNI_MEL = 16
# valid mel frames of the audio-only clips (cycled): 20, 32, 25, 39, 17 tokens; the encoder's attention windows are
# 2 * n_window = 50 mel frames, so every clip spans several windows
OMNI_AUDIO_LENGTHS = [80, 128, 100, 156, 68]
# (t, h, w) patch grids of the test videos (cycled) at 1 s per temporal grid: 25 TMRoPE units per grid, 2-s chunks
OMNI_VIDEO_GRIDS = [(3, 4, 8), (2, 4, 4), (4, 4, 4), (3, 8, 4)]


def tiny_qwen2_5_omni(attn_implementation: str = "sdpa", seed: int = 0, audio_layers: int = 2) -> torch.nn.Module:
    """Qwen2.5-Omni thinker: audio encoder (16 mel bins, ``audio_layers`` layers, 50-frame attention windows: 25
    encoder frames, so some pooled pairs straddle two windows), 3-block ViT with window attention (last block
    windowed, as in the Qwen2.5-VL case), 2-layer TMRoPE LLM of width 32; the real checkpoints' 25 position ids per
    second and 2-s chunks; special ids remapped into a 128-token vocabulary."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    text = dict(_qwen_vl_text_config())
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, temporal_patch_size=2,
                  spatial_merge_size=2, window_size=16, out_hidden_size=32, fullatt_block_indexes=[1])
    audio = dict(num_mel_bins=OMNI_MEL, d_model=32, encoder_layers=audio_layers, encoder_attention_heads=4,
                 encoder_ffn_dim=64, output_dim=32, n_window=25, max_source_positions=200)
    cfg = Qwen2_5OmniThinkerConfig(
        audio_config=audio, vision_config=vision, text_config=text, audio_token_index=OMNI_AUDIO,
        image_token_index=OMNI_IMAGE, video_token_index=OMNI_VIDEO, audio_start_token_id=OMNI_AUDIO_START,
        audio_end_token_id=OMNI_AUDIO_END, vision_start_token_id=OMNI_VISION_START,
        vision_end_token_id=OMNI_VISION_END, position_id_per_seconds=25, seconds_per_chunk=2, pad_token_id=PAD)
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def _omni_mel(length: int, frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel-like features with ``length`` valid frames (a quiet last quarter), padded to ``frames``."""
    g = torch.Generator().manual_seed(seed)
    f = torch.full((OMNI_MEL, frames), -0.5)
    f[:, :length] = torch.randn(OMNI_MEL, length, generator=g) * 0.3 + 0.5
    f[:, length - length // 4: length] = -0.4
    m = torch.zeros(frames, dtype=torch.long)
    m[:length] = 1
    return f, m


def qwen2_5_omni_audio_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    """Audio-only prompts: per clip ``<audio_bos> <audio> * n <audio_eos>`` (``tokenzip.av.omni_block``), features of
    a length from ``OMNI_AUDIO_LENGTHS`` padded to the longest, as the processor pads them. Left-padded batch."""
    from .av import omni_audio_tokens, omni_block

    cfg = model.config
    lengths = [[OMNI_AUDIO_LENGTHS[(s.seed + j) % len(OMNI_AUDIO_LENGTHS)] for j in range(s.n_items)]
               for s in samples]
    frames = max(x for row in lengths for x in row)
    rows, feats, fmasks = [], [], []
    for s, row_lengths in zip(samples, lengths):
        row = list(s.before)
        for j, length in enumerate(row_lengths):
            f, m = _omni_mel(length, frames, 100 * s.seed + j)
            feats.append(f)
            fmasks.append(m)
            row += omni_block(cfg, audio_tokens=omni_audio_tokens(length, cfg))
        rows.append(row + s.after)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "input_features": torch.stack(feats),
            "feature_attention_mask": torch.stack(fmasks)}


def qwen2_5_omni_av_inputs(model: torch.nn.Module, samples: list[Sample], use_audio_in_video: bool = True
                           ) -> dict[str, Any]:
    """Video prompts: each item is a video of grid ``OMNI_VIDEO_GRIDS[(seed + j) % 4]`` (random patches, 1 s per
    temporal grid) with its own soundtrack of the same duration (25 tokens per second: 100 mel frames per second), as
    one interleaved block (``use_audio_in_video``; off: a video block followed by an audio block). Left-padded."""
    from .av import omni_audio_tokens, omni_block

    cfg = model.config
    v = cfg.vision_config
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    grids = [[OMNI_VIDEO_GRIDS[(s.seed + j) % len(OMNI_VIDEO_GRIDS)] for j in range(s.n_items)] for s in samples]
    frames = max(100 * t for row in grids for t, _, _ in row)
    rows, feats, fmasks, pixels, thw = [], [], [], [], []
    for s, row_grids in zip(samples, grids):
        row = list(s.before)
        for j, (t, h, w) in enumerate(row_grids):
            g = torch.Generator().manual_seed(1000 + 10 * s.seed + j)
            pixels.append(torch.randn(t * h * w, patch_dim, generator=g))
            thw.append([t, h, w])
            length = 100 * t - 3 * j  # a soundtrack a few mel frames shorter than the video, as decoded files are
            f, m = _omni_mel(length, frames, 100 * s.seed + j)
            feats.append(f)
            fmasks.append(m)
            n = omni_audio_tokens(length, cfg)
            if use_audio_in_video:
                row += omni_block(cfg, video_grid=(t, h, w), second_per_grid=1.0, audio_tokens=n,
                                  use_audio_in_video=True)
            else:
                row += omni_block(cfg, video_grid=(t, h, w)) + omni_block(cfg, audio_tokens=n)
        rows.append(row + s.after)
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "input_features": torch.stack(feats),
           "feature_attention_mask": torch.stack(fmasks), "pixel_values_videos": torch.cat(pixels),
           "video_grid_thw": torch.tensor(thw, dtype=torch.long),
           "video_second_per_grid": torch.ones(len(thw))}
    if use_audio_in_video:
        out["use_audio_in_video"] = True
    return out


def qwen2_5_omni_positions(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """``[4, B, L]`` position ids as ``generate()`` builds them for the thinker: row 0 the 1-D text positions (for
    the causal mask), rows 1-3 the model's own TMRoPE positions (``get_rope_index``)."""
    mask = inputs["attention_mask"]
    fmask = inputs.get("feature_attention_mask")
    rope, _ = omni_thinker_parts(model)[0].get_rope_index(
        inputs["input_ids"], image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=mask, use_audio_in_video=bool(inputs.get("use_audio_in_video")),
        audio_seqlens=None if fmask is None else fmask.sum(-1), second_per_grids=inputs.get("video_second_per_grid"))
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0).to(rope.dtype)
    return torch.cat([text.unsqueeze(0), rope], dim=0)


CASES["qwen3_vl"] = Case("qwen3_vl", lambda attn: tiny_qwen3_vl(attn), lambda m, s: qwen3_vl_image_inputs(m, s),
                         Qwen3VLAdapter, position_ids=lambda m, i: qwen3_vl_positions(m, i), media=("image",))
CASES["qwen3_vl_video"] = Case("qwen3_vl_video", lambda attn: tiny_qwen3_vl(attn),
                               lambda m, s: qwen3_vl_video_inputs(m, s), Qwen3VLAdapter,
                               position_ids=lambda m, i: qwen3_vl_positions(m, i), media=("video",))
# audio clips alone, and videos with their interleaved soundtracks (each stream its own item)
CASES["qwen2_5_omni"] = Case("qwen2_5_omni", lambda attn: tiny_qwen2_5_omni(attn),
                             lambda m, s: qwen2_5_omni_audio_inputs(m, s), Qwen2_5OmniAdapter,
                             position_ids=lambda m, i: qwen2_5_omni_positions(m, i), media=("audio",))
CASES["qwen2_5_omni_av"] = Case("qwen2_5_omni_av", lambda attn: tiny_qwen2_5_omni(attn),
                                lambda m, s: qwen2_5_omni_av_inputs(m, s), Qwen2_5OmniAdapter,
                                position_ids=lambda m, i: qwen2_5_omni_positions(m, i), media=("video", "audio"))


# ---- Qwen3-Omni thinker (MoE text model, deepstack vision, float TMRoPE, token-by-token interleaving) --------------
from .adapters.qwen3_omni import Qwen3OmniAdapter  # noqa: E402  (appended section: merge-friendly)


def tiny_qwen3_omni(attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """Qwen3-Omni thinker: audio encoder (16 mel bins, conv2d stem of width 8, 2 layers, the real ``n_window`` 50:
    13 tokens per 100 mel frames, attention windows of 200 frames; initializer range 0.3: at 0.02 its tokens are
    dominated by the per-chunk positional embedding and repeat from chunk to chunk), 3-block ViT with deepstack
    after blocks 0 and 1, 2-layer MoE LLM (4 experts, 2 per token) with interleaved M-RoPE; 13 position ids per
    second (the processor's); special ids remapped into a 128-token vocabulary."""
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    text = dict(_qwen_vl_text_config(), moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=8)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    audio = dict(num_mel_bins=OMNI_MEL, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                 output_dim=32, n_window=50, n_window_infer=200, downsample_hidden_size=8, max_source_positions=200,
                 initializer_range=0.3)
    cfg = Qwen3OmniMoeThinkerConfig(
        audio_config=audio, vision_config=vision, text_config=text, audio_token_id=OMNI_AUDIO,
        image_token_id=OMNI_IMAGE, video_token_id=OMNI_VIDEO, audio_start_token_id=OMNI_AUDIO_START,
        audio_end_token_id=OMNI_AUDIO_END, vision_start_token_id=OMNI_VISION_START,
        vision_end_token_id=OMNI_VISION_END, position_id_per_seconds=13, pad_token_id=PAD)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


# videos with their interleaved soundtracks (token by token), before the LLM only (module doc of the adapter)
CASES["qwen3_omni"] = Case("qwen3_omni", lambda attn: tiny_qwen3_omni(attn), lambda m, s: qwen2_5_omni_av_inputs(m, s),
                           Qwen3OmniAdapter, position_ids=lambda m, i: qwen2_5_omni_positions(m, i),
                           media=("video", "audio"))


# ---- InternVL3 / InternVL3.5 (tiles + thumbnail; video frames as single tiles) ------------------------------------
from .adapters.internvl import InternVLAdapter  # noqa: E402  (appended section: merge-friendly)

INTERNVL_IMG_START, INTERNVL_IMG_END = 102, 103  # <img> / </img>
INTERNVL_FRAME, INTERNVL_NEWLINE = 60, 61  # "Frame" / "\n" text of a video prompt; "Frame{i}:" is 60, 40 + i
# tiles per test image (cycled by seed): 3 = 2 tiles + thumbnail, 1 = one tile (no thumbnail), 4 = 3 + thumbnail
INTERNVL_TILES = [3, 1, 4]
INTERNVL_FRAMES = [3, 4, 5]  # frames per test clip (cycled by seed)


def tiny_internvl(attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """InternVL: 3-layer InternViT ([CLS] + 8 x 8 patches of 4 px on 32-px tiles, pixel shuffle to 4 x 4 = 16 tokens
    per tile, q/k norms on) + 3-layer Qwen2, random weights."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=32, patch_size=4, use_qk_norm=True)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=16,
                         pad_token_id=PAD)
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation).eval()


def internvl_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    """A left-padded batch as InternVLProcessor builds it: image ``j`` of a sample with seed ``s`` has
    ``INTERNVL_TILES[(s + j) % 3]`` tiles (random normalised pixels; the last of several is the thumbnail), written
    ``<img> IMG_CONTEXT * (16 * tiles) </img>``; every tile of the batch in one ``pixel_values`` in prompt order."""
    side = model.config.vision_config.image_size[0]
    per_tile = internvl_tile_tokens(model)
    rows, pixels = [], []
    for s in samples:
        g = torch.Generator().manual_seed(s.seed)
        row = list(s.before)
        for j in range(s.n_items):
            tiles = INTERNVL_TILES[(s.seed + j) % len(INTERNVL_TILES)]
            pixels.append(torch.randn(tiles, 3, side, side, generator=g))
            row += [INTERNVL_IMG_START] + [IMAGE_TOKEN] * (per_tile * tiles) + [INTERNVL_IMG_END]
        rows.append(row + s.after)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels)}


def internvl_tile_tokens(model: torch.nn.Module) -> int:
    v = model.config.vision_config
    return int((v.image_size[0] // v.patch_size[0]) * model.config.downsample_ratio) ** 2


def internvl_video_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    """Video prompts as InternVLProcessor expands ``<video>``: clip ``j`` of a sample with seed ``s`` has
    ``INTERNVL_FRAMES[(s + j) % 3]`` frames, each ``Frame{i}: <img> IMG_CONTEXT * 16 </img>`` joined by newlines, one
    tile per frame (a fixed random picture plus a little noise per frame, so frames are alike); clips of a sample are
    separated by a text token. ``mm_token_type_ids`` marks each clip's span 2 (video), which is how the call tells
    the adapter that these blocks are one clip's frames (the processor's own output cannot say it)."""
    side = model.config.vision_config.image_size[0]
    per_tile = internvl_tile_tokens(model)
    rows, types, pixels = [], [], []
    for s in samples:
        row, kind = list(s.before), [0] * len(s.before)
        for j in range(s.n_items):
            g = torch.Generator().manual_seed(10 * s.seed + j)
            frames = INTERNVL_FRAMES[(s.seed + j) % len(INTERNVL_FRAMES)]
            base = torch.randn(3, side, side, generator=g)
            pixels.append(base + 0.2 * torch.randn(frames, 3, side, side, generator=g))
            clip: list[int] = []
            for i in range(frames):
                clip += [INTERNVL_NEWLINE] if i else []
                clip += [INTERNVL_FRAME, 40 + i + 1, INTERNVL_IMG_START] + [IMAGE_TOKEN] * per_tile + [INTERNVL_IMG_END]
            sep = [INTERNVL_NEWLINE] if j else []
            row += sep + clip
            kind += [0] * len(sep) + [2] * len(clip)
        rows.append(row + s.after)
        types.append(kind + [0] * len(s.after))
    ids, mask = left_pad(rows)
    mm_types, _ = left_pad(types, pad=0)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm_types,
            "pixel_values": torch.cat(pixels)}


CASES["internvl"] = Case("internvl", lambda attn: tiny_internvl(attn), lambda m, s: internvl_inputs(m, s),
                         InternVLAdapter, media=("image",))
CASES["internvl_video"] = Case("internvl_video", lambda attn: tiny_internvl(attn),
                               lambda m, s: internvl_video_inputs(m, s), InternVLAdapter, media=("video",))
# ---- LLaVA-NeXT and LLaVA-NeXT-Video (AnyRes images with a CLIP [CLS] tower; pooled clips without newline) ---------
from .adapters.llava_next import LlavaNextAdapter  # noqa: E402  (appended section: merge-friendly)
from .adapters.llava_next_video import LlavaNextVideoAdapter  # noqa: E402

NEXT_VIDEO_TOKEN = 101
NEXT_SIDE = 56  # CLIP crops of 56 px / 14-px patches: 4 x 4 patch tokens + [CLS]
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
NEXT_VIDEO_SIDE = 84  # NeXT-Video frames: 6 x 6 patches, pooled 2 x 2 to 3 x 3 tokens
NEXT_VIDEO_FRAMES = 5  # frames per test clip: 5 x 9 = 45 tokens


def _clip_vision_config(side: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=side, patch_size=14, projection_dim=32)


def _no_placeholder_output(model: torch.nn.Module) -> torch.nn.Module:
    """``generate()`` never emits a media placeholder id (a trained model does not; these random weights may, and an
    uncached generate() re-reads the whole sequence, whose placeholder count must match the media)."""
    ids = [int(getattr(model.config, name)) for name in ("image_token_id", "video_token_id")
           if getattr(model.config, name, None) is not None]
    model.generation_config.suppress_tokens = ids
    return model


def tiny_llava_next(attn_implementation: str = "sdpa", seed: int = 0, **config: Any) -> torch.nn.Module:
    """CLIP (56-px crops, 4 x 4 patches + [CLS], features from layer -2, [CLS] dropped) + Llama, AnyRes pinpoints up
    to 112 x 112, random weights. ``config`` overrides LlavaNextConfig fields."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    kw: dict[str, Any] = dict(image_token_index=IMAGE_TOKEN, image_grid_pinpoints=NEXT_PINPOINTS, pad_token_id=PAD,
                              vision_feature_layer=-2, vision_feature_select_strategy="default")
    kw.update(config)
    cfg = LlavaNextConfig(vision_config=_clip_vision_config(NEXT_SIDE), text_config=_llama_text_config(), **kw)
    torch.manual_seed(seed)
    return _no_placeholder_output(
        LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation).eval())


def tiny_llava_next_video(attn_implementation: str = "sdpa", seed: int = 0, **config: Any) -> torch.nn.Module:
    """LLaVA-NeXT-Video: CLIP (84-px frames/crops, 6 x 6 patches + [CLS]) + Llama, the 2 x 2 average pooler (3 x 3
    tokens per frame), AnyRes pinpoints up to 168 x 168 for images, random weights."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    s = NEXT_VIDEO_SIDE
    kw: dict[str, Any] = dict(image_token_index=IMAGE_TOKEN, video_token_index=NEXT_VIDEO_TOKEN,
                              image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]], pad_token_id=PAD,
                              vision_feature_layer=-2, vision_feature_select_strategy="default",
                              spatial_pool_mode="average", spatial_pool_stride=2)
    kw.update(config)
    cfg = LlavaNextVideoConfig(vision_config=_clip_vision_config(s), text_config=_llama_text_config(), **kw)
    torch.manual_seed(seed)
    return _no_placeholder_output(
        LlavaNextVideoForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation).eval())


def next_image_processor(model: torch.nn.Module):
    """The real (PIL-backend) LLaVA-NeXT image processor, sized for ``model``."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    side = model.config.vision_config.image_size
    return LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                      image_grid_pinpoints=model.config.image_grid_pinpoints)


def llava_next_inputs(model: torch.nn.Module, samples: list[Sample], *, scale: int = 1) -> dict[str, Any]:
    """A left-padded batch as LlavaNextProcessor would build it: real image-processor outputs (5-D ``pixel_values``,
    ``image_sizes``) for random images of ``ONEVISION_SIZES`` (times ``scale``: different sizes and crop counts
    across samples; every image tiled), and as many placeholders per image as the model's own
    ``get_image_features`` returns features."""
    from PIL import Image

    images = [[Image.fromarray(im) if not isinstance(im, Image.Image) else im for im in row]
              for row in onevision_images(samples)]
    if scale != 1:
        images = [[im.resize((im.width * scale, im.height * scale)) for im in row] for row in images]
    px = next_image_processor(model)([im for row in images for im in row], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(px["pixel_values"], px["image_sizes"], return_dict=True).pooler_output
    counts = iter(int(f.shape[0]) for f in feats)
    rows = [s.before + [IMAGE_TOKEN] * sum(next(counts) for _ in range(s.n_items)) + s.after for s in samples]
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": px["pixel_values"],
            "image_sizes": px["image_sizes"]}


def next_video_tokens(model: torch.nn.Module, frames: int) -> int:
    """``<video>`` placeholders of one LLaVA-NeXT-Video clip: ``frames`` x ``(side // stride)^2``, no newline."""
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.spatial_pool_stride
    return frames * g * g


def llava_next_video_inputs(model: torch.nn.Module, samples: list[Sample], *,
                            frames: int = NEXT_VIDEO_FRAMES) -> dict[str, Any]:
    """A left-padded batch of video prompts: each of a sample's ``n_items`` clips is a synthetic clip (48 x 64 px,
    seed ``10 * sample seed + j``) resized to the tower's square size with the CLIP mean/std (what
    LlavaNextVideoVideoProcessor gives up to its shortest-edge resize + centre crop; ``onevision_video_pixels``), with
    ``frames * g * g`` ``<video>`` placeholders per clip."""
    from .video import onevision_video_pixels, onevision_video_processor, synthetic_clip

    clips = [synthetic_clip(frames, 48, 64, seed=10 * s.seed + j).frames for s in samples for j in range(s.n_items)]
    pixels = onevision_video_pixels(clips, onevision_video_processor(model.config.vision_config.image_size))
    per_clip = next_video_tokens(model, frames)
    rows = [s.before + [NEXT_VIDEO_TOKEN] * (per_clip * s.n_items) + s.after for s in samples]
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixels}


# images of different sizes and crop counts (every image tiled, as NeXT does), before, inside and in the LLM
CASES["llava_next"] = Case("llava_next", lambda attn: tiny_llava_next(attn), lambda m, s: llava_next_inputs(m, s),
                           LlavaNextAdapter)
# clips only (every clip of a call has NEXT_VIDEO_FRAMES frames: the model takes one tensor), before and in the LLM,
# and frame selection before the tower
CASES["llava_next_video"] = Case("llava_next_video", lambda attn: tiny_llava_next_video(attn),
                                 lambda m, s: llava_next_video_inputs(m, s), LlavaNextVideoAdapter,
                                 media=("video",), only_stages=("pre_llm", "llm"))
# ---- Gemma 3 -------------------------------------------------------------------------------------------------------
GEMMA3_BOI, GEMMA3_EOI = 102, 103  # <start_of_image> / <end_of_image>
# sliding / global layers (Gemma 3 alternates 5:1; here mixed within 4 layers) with a window shorter than an image
# block, so the window bites inside blocks, across them and in decoding
GEMMA3_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
GEMMA3_WINDOW = 12


def tiny_gemma3(attn_implementation: str = "sdpa", seed: int = 0, **text_config: Any) -> torch.nn.Module:
    """SigLIP (32-px images of 4-px patches: 8 x 8) pooled to 4 x 4 = 16 tokens per image + a 4-layer Gemma 3
    decoder (sliding and global layers, window 12), random weights. ``text_config`` overrides Gemma3TextConfig
    fields."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=4, vision_use_head=False)
    kw: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                              max_position_embeddings=512, sliding_window=GEMMA3_WINDOW,
                              layer_types=list(GEMMA3_LAYER_TYPES), pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    kw.update(text_config)
    cfg = Gemma3Config(text_config=Gemma3TextConfig(**kw), vision_config=vision, mm_tokens_per_image=16,
                       boi_token_index=GEMMA3_BOI, eoi_token_index=GEMMA3_EOI, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def gemma3_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    """A left-padded batch as Gemma3Processor builds it: per image ``<start_of_image>`` + 16 soft tokens +
    ``<end_of_image>``, ``token_type_ids`` 1 at the soft tokens (the bidirectional blocks), one pixel tensor."""
    size = model.config.vision_config.image_size
    n = int(model.config.mm_tokens_per_image)
    rows, pixels = [], []
    for s in samples:
        rows.append(s.before + [GEMMA3_BOI, *([IMAGE_TOKEN] * n), GEMMA3_EOI] * s.n_items + s.after)
        g = torch.Generator().manual_seed(s.seed)
        pixels.append(torch.randn(s.n_items, 3, size, size, generator=g))
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == IMAGE_TOKEN).long(),
            "pixel_values": torch.cat(pixels)}


# ---- SmolVLM / Idefics3 --------------------------------------------------------------------------------------------
SMOLVLM_FAKE, SMOLVLM_GLOBAL, SMOLVLM_NEWLINE = 104, 105, 110  # <fake_token_around_image>, <global-img>, "\n"
SMOLVLM_ROW_COL = 106  # <row_{i+1}_col_{j+1}> = 106 + 2 i + j (grids up to 2 x 2)
# (rows, cols) of tiles of image j of a sample with seed s: SMOLVLM_GRIDS[(s + j) % 4]; (1, 1): not split (global
# image only). Samples get different tile counts (3, 4 and 5 tiles in default_samples()).
SMOLVLM_GRIDS = [(2, 2), (1, 2), (2, 1), (1, 1)]


def tiny_smolvlm(attn_implementation: str = "sdpa", seed: int = 0, idefics3: bool = False) -> torch.nn.Module:
    """SigLIP (32-px tiles of 4-px patches: 8 x 8), pixel shuffle 2 -> 16 tokens per tile, Llama decoder, random
    weights; ``idefics3``: the same sizes as ``Idefics3ForConditionalGeneration``."""
    import transformers as tf

    name = "Idefics3" if idefics3 else "SmolVLM"
    vision = getattr(tf, f"{name}VisionConfig")(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=4)
    cfg = getattr(tf, f"{name}Config")(vision_config=vision, text_config=_llama_text_config(), scale_factor=2,
                                       image_token_id=IMAGE_TOKEN, pad_token_id=PAD)
    torch.manual_seed(seed)
    model = getattr(tf, f"{name}ForConditionalGeneration")._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def _smolvlm_image(rows: int, cols: int, tokens: int) -> list[int]:
    """The processor's prompt for one image of ``rows x cols`` tiles plus its global image."""
    run = [IMAGE_TOKEN] * tokens
    if rows * cols == 1:
        return [SMOLVLM_FAKE, SMOLVLM_GLOBAL, *run, SMOLVLM_FAKE]
    out: list[int] = []
    for i in range(rows):
        for j in range(cols):
            out += [SMOLVLM_FAKE, SMOLVLM_ROW_COL + 2 * i + j, *run]
        out.append(SMOLVLM_NEWLINE)
    return out + [SMOLVLM_NEWLINE, SMOLVLM_FAKE, SMOLVLM_GLOBAL, *run, SMOLVLM_FAKE]


def smolvlm_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    """A left-padded batch as SmolVLMProcessor builds it: each image's tiles then its global image in
    ``pixel_values [B, max tiles, 3, S, S]`` (all-zero tiles pad the samples with fewer), ``pixel_attention_mask``
    (the global image of a 1 x 2 grid is padded below, as a wide image's is), per-tile markers in the prompt."""
    size = model.config.vision_config.image_size
    tokens = (size // model.config.vision_config.patch_size // model.config.scale_factor) ** 2
    rows, tiles, masks = [], [], []
    for s in samples:
        g = torch.Generator().manual_seed(s.seed)
        row, px, pm = list(s.before), [], []
        for j in range(s.n_items):
            r, c = SMOLVLM_GRIDS[(s.seed + j) % len(SMOLVLM_GRIDS)]
            row += _smolvlm_image(r, c, tokens)
            n = r * c + (1 if r * c > 1 else 0)
            px.append(torch.randn(n, 3, size, size, generator=g))
            m = torch.ones(n, size, size, dtype=torch.bool)
            if (r, c) == (1, 2):  # the global image of a wide picture: its lower part is padding
                m[-1, size // 2 + 4:] = False
                px[-1][-1, :, size // 2 + 4:] = 0
            pm.append(m)
        rows.append(row + s.after)
        tiles.append(torch.cat(px))
        masks.append(torch.cat(pm))
    width = max(t.shape[0] for t in tiles)
    pixel_values = torch.zeros(len(samples), width, 3, size, size)
    pixel_mask = torch.zeros(len(samples), width, size, size, dtype=torch.bool)
    for i, (t, m) in enumerate(zip(tiles, masks)):
        pixel_values[i, : t.shape[0]] = t
        pixel_mask[i, : m.shape[0]] = m
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
            "pixel_attention_mask": pixel_mask}


def gemma3_lm_tokens(kwargs: dict[str, Any]) -> torch.Tensor:
    """What Gemma 3's decoder reads, ``[B, L]``: it gets a dict of prepared 4-D masks, not the 2-D mask; the keys
    the last query row of the full-attention mask may attend (every real token: the row is causal-complete)."""
    mask = kwargs["attention_mask"]
    full = mask["full_attention"] if isinstance(mask, dict) else mask
    if full.dim() == 2:
        return full.clone()
    row = full[:, 0, -1]
    return row.clone() if row.dtype == torch.bool else row == 0


def _register_gemma3_smolvlm() -> None:
    from .adapters import Gemma3Adapter, SmolVLMAdapter

    CASES["gemma3"] = Case("gemma3", lambda attn: tiny_gemma3(attn), lambda m, s: gemma3_inputs(m, s), Gemma3Adapter,
                           lm_tokens=gemma3_lm_tokens)
    CASES["smolvlm"] = Case("smolvlm", lambda attn: tiny_smolvlm(attn), lambda m, s: smolvlm_inputs(m, s),
                            SmolVLMAdapter)


_register_gemma3_smolvlm()


# ---- Qwen3.5 (hybrid LLM) and GLM-4.1V ------------------------------------------------------------------------------
from .adapters.glm4v import Glm4vAdapter  # noqa: E402  (appended section: merge-friendly)
from .adapters.qwen3_5 import Qwen3_5Adapter  # noqa: E402

# Qwen3.5's decoder kinds in the tiny model: a full-attention layer first (LLM-stage methods score their first stage
# with layer 0's attention), then two Gated DeltaNet layers that run on the shortened sequence, then full attention
QWEN3_5_LAYERS = ("full_attention", "linear_attention", "linear_attention", "full_attention")
GLM_IMAGE_START, GLM_IMAGE_END, GLM_VIDEO_START, GLM_VIDEO_END = 102, 103, 104, 105
# (t, h, w) patch grids of GLM's test clips (cycled by sample seed + clip index): 2, 3 and 2 temporal grids of 6, 4
# and 6 tokens
GLM_CLIPS = [(2, 4, 6), (3, 4, 4), (2, 6, 4)]
# GLM's test clips are frames GLM_FIRST_FRAME, ... of a GLM_FPS video: temporal grid g's timestamp is the second of its
# first frame, 8, 10, 12 (one- and two-digit timestamps: blocks of different lengths)
GLM_FIRST_FRAME, GLM_FPS = 8, 1.0


def tiny_qwen3_5(attn_implementation: str = "sdpa", seed: int = 0, layer_types: tuple[str, ...] = QWEN3_5_LAYERS,
                 moe: bool = False, vision_depth: int = 2) -> torch.nn.Module:
    """Qwen3.5: ``vision_depth``-block ViT (4-px patches, 2x2 merger, no DeepStack) + a hybrid M-RoPE LLM of
    ``layer_types`` (Gated DeltaNet linear-attention and gated full-attention layers), random weights. ``moe``: the
    Qwen3.5-MoE class (2 experts, top-1)."""
    import transformers

    text: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=len(layer_types), layer_types=list(layer_types),
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                                linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=512,
                                pad_token_id=PAD, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                                                 "partial_rotary_factor": 0.5})
    if moe:
        text.update(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=16)
    prefix = "Qwen3_5Moe" if moe else "Qwen3_5"
    cfg = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision, **_qwen_vl_token_ids())
    torch.manual_seed(seed)
    cls = getattr(transformers, f"{prefix}ForConditionalGeneration")
    return _no_placeholder_output(cls._from_config(cfg, attn_implementation=attn_implementation).eval())


def _no_placeholder_output(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights can make greedy decoding emit a placeholder id, which an uncached ``generate()`` would then
    count as one more media placeholder (a real checkpoint never emits them): ``generate()`` suppresses them."""
    model.generation_config.suppress_tokens = [IMAGE_TOKEN, QWEN_VIDEO_TOKEN]
    return model


def tiny_glm4v(attn_implementation: str = "sdpa", seed: int = 0, vision_depth: int = 2) -> torch.nn.Module:
    """GLM-4.1V: ``vision_depth``-block ViT (4-px patches, 2x2 conv downsample + merger) + 3-layer M-RoPE LLM (half
    the head dimensions rotary), random weights."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512, pad_token_id=PAD, initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "partial_rotary_factor": 0.5})
    vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=32, image_size=16)
    cfg = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                      video_token_id=QWEN_VIDEO_TOKEN, image_start_token_id=GLM_IMAGE_START,
                      image_end_token_id=GLM_IMAGE_END, video_start_token_id=GLM_VIDEO_START,
                      video_end_token_id=GLM_VIDEO_END)
    torch.manual_seed(seed)
    return _no_placeholder_output(Glm4vForConditionalGeneration._from_config(
        cfg, attn_implementation=attn_implementation).eval())


def glm4v_image_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    """A left-padded batch as ``Glm4vProcessor`` lays out images: ``<|begin_of_image|> <|image|>*(h*w/4)
    <|end_of_image|>`` per image (grids as :func:`qwen_vl_inputs`), ``mm_token_type_ids`` 1 at the placeholders."""
    return qwen_vl_inputs(model, samples, markers=(GLM_IMAGE_START, GLM_IMAGE_END))


def glm4v_timestamp_ids(seconds: float) -> list[int]:
    """Text token ids of ``Glm4vProcessor``'s timestamp ``str(int(seconds))`` in the tiny vocabulary: one id per
    digit (40-49)."""
    return [40 + int(ch) for ch in str(int(seconds))]


def glm4v_video_inputs(model: torch.nn.Module, samples: list[Sample], *,
                       grids: list[list[int]] | None = None) -> dict[str, Any]:
    """A left-padded batch of GLM-4.1V video prompts as ``Glm4vProcessor`` lays them out. Clip ``j`` of a sample with
    seed ``s`` has the patch grid ``(t, h, w) = GLM_CLIPS[(s + j) % 3]``: a synthetic clip
    (``tokenzip.video.synthetic_clip``) of ``t * temporal_patch_size`` frames at the grid's size, frames
    ``GLM_FIRST_FRAME, ...`` of a ``GLM_FPS`` video. Pixels as ``Glm4vVideoProcessor`` computes them: its fused
    rescale and normalise (reproduced here: the processor's own needs torchvision), then its own ``patchify``; the
    frames are at the grid's size, so no resize. In the
    prompt: ``<|begin_of_video|>``, then per temporal grid ``<|begin_of_image|>``, the grid's placeholders (the IMAGE
    token), ``<|end_of_image|>`` and the whole second of the grid's first frame (:func:`glm4v_timestamp_ids`), then
    ``<|end_of_video|>``. ``mm_token_type_ids`` is 2 at the clips' placeholders. ``grids``: per clip (in batch
    order), the temporal grids to keep (their frames, timestamps and blocks only: what the processor gives for those
    frames)."""
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    from .video import synthetic_clip

    v = model.config.vision_config
    tp, patch, merge = int(v.temporal_patch_size), int(v.patch_size), int(v.spatial_merge_size)
    proc = Glm4vVideoProcessor(patch_size=patch, temporal_patch_size=tp, merge_size=merge)
    # the processor's fused rescale + normalise: mean and std scaled by 1 / rescale_factor, in float32
    mean = torch.tensor([m * (1.0 / proc.rescale_factor) for m in proc.image_mean])[:, None, None]
    std = torch.tensor([d * (1.0 / proc.rescale_factor) for d in proc.image_std])[:, None, None]
    unit = merge ** 2
    rows, pixels, grid_rows = [], [], []
    clip_index = 0
    for s in samples:
        row = list(s.before)
        for j in range(s.n_items):
            t, h, w = GLM_CLIPS[(s.seed + j) % len(GLM_CLIPS)]
            keep = list(range(t)) if grids is None else list(grids[clip_index])
            clip_index += 1
            clip = synthetic_clip(t * tp, h * patch, w * patch, seed=10 * s.seed + j)
            frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).to(torch.float32)
            frames = frames.view(t, tp, *frames.shape[1:])[keep].flatten(0, 1)
            px, gt, gh, gw = proc.patchify(((frames - mean) / std)[None], patch_size=patch, merge_size=merge,
                                           temporal_patch_size=tp)
            pixels.append(px[0])
            grid_rows.append([gt, gh, gw])
            row.append(GLM_VIDEO_START)
            for g in keep:
                row += [GLM_IMAGE_START] + [IMAGE_TOKEN] * (h * w // unit) + [GLM_IMAGE_END]
                row += glm4v_timestamp_ids((GLM_FIRST_FRAME + g * tp) / GLM_FPS)
            row.append(GLM_VIDEO_END)
        rows.append(row + s.after)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE_TOKEN).int() * 2,
            "pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grid_rows, dtype=torch.long)}


CASES["qwen3_5"] = Case("qwen3_5", lambda attn: tiny_qwen3_5(attn), lambda m, s: qwen_vl_inputs(m, s), Qwen3_5Adapter,
                        position_ids=lambda m, i: qwen3_vl_positions(m, i), media=("image",))
CASES["qwen3_5_video"] = Case("qwen3_5_video", lambda attn: tiny_qwen3_5(attn),
                              lambda m, s: qwen3_vl_video_inputs(m, s), Qwen3_5Adapter,
                              position_ids=lambda m, i: qwen3_vl_positions(m, i), media=("video",))
CASES["glm4v"] = Case("glm4v", lambda attn: tiny_glm4v(attn), lambda m, s: glm4v_image_inputs(m, s), Glm4vAdapter,
                      position_ids=lambda m, i: qwen3_vl_positions(m, i), media=("image",))
CASES["glm4v_video"] = Case("glm4v_video", lambda attn: tiny_glm4v(attn), lambda m, s: glm4v_video_inputs(m, s),
                            Glm4vAdapter, position_ids=lambda m, i: qwen3_vl_positions(m, i), media=("video",))
