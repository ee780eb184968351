"""What a vLLM engine is told to run, checked without vLLM: the ``tokenzip`` key of the HF config (set through
``hf_overrides``), the methods that fit vLLM's pruning contract and the architectures tokenzip serves.

vLLM's contract (``SupportsMultiModalPruning``) fixes each media item's placeholder count when the prompt is
processed, before the vision encoder runs, and lets the model choose which embeddings fill the placeholders. So a
method fits when it is a pre-LLM method (stage ``"pre_llm"``) that compresses one item at a time to an exact budget
from the vision tower's own output and signals. Out of it: LLM-stage methods (FastV, SparseVLM ...: they drop
tokens inside the decoder, which needs vLLM's KV-cache slot mapping), query-aware methods (the encoder path sees no
prompt text), stage ``"encoder"`` and ``"input"`` methods, and joint methods (OmniZip: audio guides video).
"""

from __future__ import annotations

import os
from typing import Any

from ..base import Compressor, JointCompressor
from ..registry import method_class

KEY = "tokenzip"  # the HF config attribute (a dict) that carries the method and its budget
# HF architecture -> the tokenzip class registered with vLLM's ModelRegistry
ARCHITECTURES = {
    "Qwen2_5_VLForConditionalGeneration": "TokenzipQwen2_5_VLForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "TokenzipQwen2VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "TokenzipQwen3VLForConditionalGeneration",
}
# tokenzip class -> the module that defines it (imported by vLLM only when a config selects the class)
MODULES = {
    "TokenzipQwen2_5_VLForConditionalGeneration": "tokenzip.vllm.qwen_vl",
    "TokenzipQwen2VLForConditionalGeneration": "tokenzip.vllm.qwen_vl",
    "TokenzipQwen3VLForConditionalGeneration": "tokenzip.vllm.qwen3_vl",
}
MODALITIES = ("image", "video")
# what the vLLM models compute for a method: attention received and keys in the last vision block (from vLLM's own
# q/k), and the item's LLM-space tokens themselves
SIGNALS = frozenset({"cls_attention", "keys", "projected"})
VLLM_MINOR = "0.32"  # the hooks are private vLLM APIs that move between minor releases: one tested minor


def check_method(name: Any, retain: float | None = None, tokens: int | None = None,
                 **fields: Any) -> Compressor:
    """The configured method, or a ValueError/TypeError saying why vLLM cannot serve it."""
    cls = method_class(name)  # ValueError for an unknown name, with the close matches
    info = cls.info
    if info.stage != "pre_llm":
        why = {"llm": "it drops tokens inside the decoder, which needs vLLM's KV-cache slot mapping",
               "encoder": "it runs between the vision encoder's layers",
               "input": "it changes the model's inputs (frames, resolution) before the processor"}
        raise ValueError(f"method {info.name!r} (stage {info.stage!r}) cannot run in vLLM: "
                         f"{why.get(info.stage, 'not a pre-LLM method')}; vLLM serves pre-LLM methods: "
                         f"{', '.join(serving_methods())}")
    if info.query_aware:
        raise ValueError(f"method {info.name!r} needs the prompt text, which vLLM's encoder path does not see; "
                         f"vLLM serves query-agnostic pre-LLM methods: {', '.join(serving_methods())}")
    if issubclass(cls, JointCompressor):
        raise ValueError(f"method {info.name!r} compresses all items of a sample together; vLLM encodes items "
                         f"independently (serves: {', '.join(serving_methods())})")
    if not set(info.modalities) & set(MODALITIES):
        raise ValueError(f"method {info.name!r} compresses {list(info.modalities)}; vLLM's tokenzip models serve "
                         f"{list(MODALITIES)}")
    method = cls(retain=retain, tokens=tokens, **fields)  # the budget's own ValueError/TypeError
    missing = sorted(method.signals_needed() - SIGNALS)
    if missing:
        raise ValueError(f"method {info.name!r} needs signals {missing}; the vLLM models compute {sorted(SIGNALS)}")
    return method


def serving_methods() -> list[str]:
    """Names of the registered methods vLLM can serve (pre-LLM, query-agnostic, one item at a time, image/video,
    with signals the vLLM models compute)."""
    from ..methods import METHODS

    out = []
    for cls in METHODS:
        info = cls.info
        if info.stage == "pre_llm" and not info.query_aware and not issubclass(cls, JointCompressor) \
                and set(info.modalities) & set(MODALITIES) and set(cls.requires) <= SIGNALS:
            out.append(info.name)
    return sorted(out)


def method_from_config(hf_config: Any) -> Compressor:
    """The method an HF config's ``tokenzip`` key names (``{"method": ..., "retain"/"tokens": ..., fields}``)."""
    spec = getattr(hf_config, KEY, None)
    if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
        raise ValueError(f"tokenzip's vLLM models need hf_overrides[{KEY!r}] = {{'method': NAME, 'retain': R}} "
                         f"(tokenzip.vllm.overrides builds it), got {spec!r}")
    args = {k: v for k, v in spec.items() if k != "method"}
    return check_method(spec["method"], **args)


def item_count(method: Compressor, modality: str, n: int) -> int:
    """Tokens (placeholders) a media item of ``modality`` with ``n`` tokens keeps: the method's budget of ``n`` for
    the modalities it compresses, all ``n`` for the others (they reach the LLM whole, as on the HF path)."""
    return method.budget.count(n) if modality in method.info.modalities else n


def architecture_for(model: str) -> str:
    """The tokenzip architecture for ``model``: an HF architecture name, or a checkpoint (a local directory or a hub
    id; its ``config.json`` is read with transformers' ``AutoConfig``)."""
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a checkpoint path, hub id or HF architecture name (str), got {model!r}")
    if model in ARCHITECTURES:
        return ARCHITECTURES[model]
    if model in ARCHITECTURES.values():
        return model
    if "/" not in model and not os.path.isdir(model):  # neither a hub id nor a directory: an architecture name
        raise ValueError(f"model {model!r} is not an architecture tokenzip's vLLM plugin serves "
                         f"({sorted(ARCHITECTURES)}), a checkpoint directory or a hub id")
    from transformers import AutoConfig

    archs = list(getattr(AutoConfig.from_pretrained(model), "architectures", None) or [])
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(f"model {model!r} has architectures {archs}; tokenzip's vLLM plugin serves "
                     f"{sorted(ARCHITECTURES)}")


def overrides(method: str, *, model: str, retain: float | None = None, tokens: int | None = None,
              **fields: Any) -> dict[str, Any]:
    """``hf_overrides`` for vLLM that serve ``model`` compressed by ``method``:
    ``LLM(model, hf_overrides=tokenzip.vllm.overrides("visionzip", model=model, retain=0.1))``. The dict is JSON
    (``vllm serve MODEL --hf-overrides "$(python -c ...)"``); the method is checked here and again at engine load."""
    check_method(method, retain=retain, tokens=tokens, **fields)
    spec: dict[str, Any] = {"method": method}
    if retain is not None:
        spec["retain"] = retain
    if tokens is not None:
        spec["tokens"] = tokens
    spec.update(fields)
    return {"architectures": [architecture_for(model)], KEY: spec}
