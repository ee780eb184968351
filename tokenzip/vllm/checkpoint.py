"""A random-weight Qwen-VL checkpoint directory vLLM can load offline: the model's weights, and a tokenizer and
processor made locally (a small byte-level BPE with Qwen's special tokens; the model's config takes their ids). Used by
``tokenzip bench --engine vllm`` and the vLLM tests; no hub access."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
CORPUS = ["describe the picture in one short sentence please", "what is shown in the video and the image",
          "a cat sits on a red mat near the window", "tokens numbers letters 0123456789 abcdefghijklmnopqrstuvwxyz"]
PIXELS = 14 * 14 * 4  # one merged token's worth of pixels (14-px patches, 2x2 merge)


def tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>",
                                                         "vision_bos_token": "<|vision_start|>",
                                                         "vision_eos_token": "<|vision_end|>"})


def token_ids(tok: Any) -> dict[str, int]:
    """The media token ids of ``tok``, as Qwen-VL configs name them."""
    return {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}


def save(path: str | Path, model: Any, tok: Any, min_pixels: int, max_pixels: int) -> Path:
    """Save ``model`` with ``tok`` and a Qwen-VL processor (image and video processors bounded by the pixel
    counts) in ``path``."""
    import transformers as tf

    model.save_pretrained(path)
    bounds = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    model_type = model.config.model_type
    if model_type == "qwen3_vl":  # 16-px patches; its video processor takes the bounds as ``size``
        patch = dict(patch_size=int(model.config.vision_config.patch_size))
        proc = tf.Qwen3VLProcessor(
            image_processor=tf.Qwen2VLImageProcessor(**bounds, **patch),
            video_processor=tf.Qwen3VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                                     **patch, fps=2.0, do_sample_frames=False),
            tokenizer=tok)
    else:
        proc_cls = tf.Qwen2_5_VLProcessor if model_type == "qwen2_5_vl" else tf.Qwen2VLProcessor
        proc = proc_cls(image_processor=tf.Qwen2VLImageProcessor(**bounds),
                        video_processor=tf.Qwen2VLVideoProcessor(**bounds, fps=2.0, do_sample_frames=False),
                        tokenizer=tok)
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
