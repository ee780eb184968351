"""Model adapters, looked up by the model's class."""

from __future__ import annotations

import torch

from .base import Adapter, Item
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_omni import Qwen2_5OmniAdapter
from .qwen2_audio import Qwen2AudioAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_omni import Qwen3OmniAdapter
from .qwen3_vl import Qwen3VLAdapter
from .smolvlm import SmolVLMAdapter
from .whisper import WhisperAdapter

ADAPTERS: list[type[Adapter]] = [
    LlavaAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    WhisperAdapter,
    Qwen2AudioAdapter,
    Qwen3VLAdapter,
    Qwen2_5OmniAdapter,
    Qwen3OmniAdapter,
    InternVLAdapter,
    LlavaNextAdapter,
    LlavaNextVideoAdapter,
    Gemma3Adapter,
    SmolVLMAdapter,
]


def supported_models() -> list[str]:
    return [name for cls in ADAPTERS for name in cls.model_classes]


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for ``model``; a TypeError naming the supported classes otherwise."""
    names = {c.__name__ for c in type(model).__mro__}
    for cls in ADAPTERS:
        if names & set(cls.model_classes):
            return cls(model)
    raise TypeError(f"tokenzip does not support {type(model).__name__}; supported models: "
                    f"{', '.join(supported_models())}")


__all__ = ["ADAPTERS", "Adapter", "Item", "LlavaAdapter", "LlavaOnevisionAdapter", "Qwen2AudioAdapter",
           "Qwen2VLAdapter", "Qwen3VLAdapter", "WhisperAdapter", "adapter_for", "supported_models"]
__all__ += ["Qwen2_5OmniAdapter", "Qwen3OmniAdapter"]
__all__ += ["InternVLAdapter"]
__all__ += ["LlavaNextAdapter", "LlavaNextVideoAdapter"]
__all__ += ["Gemma3Adapter", "SmolVLMAdapter"]

# Qwen3.5 (hybrid LLM) and GLM-4.1V / 4.6V: the shared M-RoPE machinery is adapters/mrope_vl.py
from .glm4v import Glm4vAdapter  # noqa: E402
from .qwen3_5 import Qwen3_5Adapter  # noqa: E402

ADAPTERS += [Qwen3_5Adapter, Glm4vAdapter]
__all__ += ["Glm4vAdapter", "Qwen3_5Adapter"]
