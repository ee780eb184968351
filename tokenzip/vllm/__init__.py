"""tokenzip as a vLLM plugin: serve Qwen2.5-VL / Qwen2-VL (images and videos) and Qwen3-VL (images) compressed.

    from vllm import LLM
    import tokenzip.vllm

    llm = LLM(MODEL, hf_overrides=tokenzip.vllm.overrides("visionzip", model=MODEL, retain=0.1))

``pip install "tokenzip[vllm]"`` installs vLLM 0.32 and registers the entry point ``tokenzip`` in vLLM's group
``vllm.general_plugins``: vLLM calls :func:`register` in every process it starts, which registers tokenzip's model
classes (subclasses of vLLM's in-tree models, tokenzip/vllm/qwen_vl.py and qwen3_vl.py) with ``ModelRegistry``.
``hf_overrides`` selects one (``architectures``) and names the method (the ``tokenzip`` key of the HF config, read by
the processor, which fixes the placeholder count, and by the model, which chooses the tokens). Importing this module
does not import vLLM; only the model classes do.
"""

from __future__ import annotations

from .config import ARCHITECTURES, KEY, VLLM_MINOR, check_method, method_from_config, overrides, serving_methods

__all__ = ["ARCHITECTURES", "KEY", "VLLM_MINOR", "check_method", "method_from_config", "overrides", "register",
           "serving_methods"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register tokenzip's architectures with vLLM (lazily: vLLM imports
    tokenzip/vllm/qwen_vl.py or qwen3_vl.py only when a config selects one of them)."""
    from vllm import ModelRegistry

    from .config import MODULES

    known = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES.values():
        if arch not in known:
            ModelRegistry.register_model(arch, f"{MODULES[arch]}:{arch}")
