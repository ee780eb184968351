"""Model inputs from a processor: one image (or video) and a user prompt, the one way the CLI, the demo and the
bench build them."""

from __future__ import annotations

import logging
import string
from collections.abc import Sequence
from typing import Any

import torch

DEFAULT_PROMPT = "Describe the image."


def processor_inputs(processor: Any, image: Any, prompt: str, video: Any = None) -> dict[str, Any]:
    """Model inputs for one image (or ``video``) and ``prompt``: through the processor's chat template when it has
    one (media first), else ``<image>\\n`` + prompt (the processor's own image token)."""
    media = {"type": "video"} if video is not None else {"type": "image"}
    text = prompt
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [media, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    else:
        token = getattr(processor, "video_token" if video is not None else "image_token", None) \
            or ("<video>" if video is not None else "<image>")
        if token not in prompt:
            text = f"{token}\n{prompt}"
    kw: dict[str, Any] = {"text": text, "return_tensors": "pt"}
    if video is not None:
        kw["videos"] = video
    else:
        kw["images"] = image
    return dict(processor(**kw))


def encoder_view(processor: Any, pixel_values: Any):
    """The picture the encoder saw: one image's ``pixel_values`` with the processor's normalisation undone."""
    from ..viz import pixels_to_image

    ip = getattr(processor, "image_processor", processor)
    return pixels_to_image(pixel_values, getattr(ip, "image_mean", None), getattr(ip, "image_std", None))


def image_processor(name: str, **kw: Any):
    """An image processor built from published preprocessing values (PIL backend: no torchvision needed)."""
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    return cls(**kw)


def tiny_processor(model: torch.nn.Module, words: Sequence[str] = ()) -> Any:
    """A word-level tokenizer + CLIP image processor matching ``tokenzip.testing.tiny_llava``'s config
    (vocabulary 128, ``<image>`` = its image token id). For smoke tests only: the model's weights are random."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    cfg = model.config
    vocab_size = int(cfg.text_config.vocab_size)
    image_id = int(cfg.image_token_id)
    specials = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    prompt_words = ["answer", "the", "question", "using", "a", "single", "word", "or", "phrase", "with", "option's",
                    "letter", "from", "given", "choices", "directly", "what", "is", "yes", "no", "color", "of", "in",
                    "image", "\n"]
    base = list(dict.fromkeys([w.lower() for w in words] + list(string.ascii_uppercase) + [str(i) for i in range(10)]
                              + list(".,:?!()'") + prompt_words))
    vocab = dict(specials)
    nxt = len(specials)
    for w in base:
        while nxt == image_id:
            nxt += 1
        if nxt >= vocab_size:
            break
        if w not in vocab:
            vocab[w] = nxt
            nxt += 1
    vocab["<image>"] = image_id
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["<image>"])
    tok.image_token = "<image>"
    tok.image_token_id = image_id
    size = int(cfg.vision_config.image_size)
    image_proc = image_processor("CLIPImageProcessor", size={"shortest_edge": size},
                            crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=int(cfg.vision_config.patch_size),
                          vision_feature_select_strategy=cfg.vision_feature_select_strategy, image_token="<image>",
                          num_additional_image_tokens=1)


__all__ = ["DEFAULT_PROMPT", "encoder_view", "image_processor", "processor_inputs", "tiny_processor"]
