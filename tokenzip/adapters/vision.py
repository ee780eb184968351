"""Helpers for ViT-style vision towers (CLIP, SigLIP, DINOv2): where the layers are, whether there is a CLS token."""

from __future__ import annotations

import torch


def find_module_list(root: torch.nn.Module, paths: tuple[str, ...]) -> torch.nn.ModuleList | None:
    """The first of the dotted attribute ``paths`` under ``root`` that is a ModuleList, or None."""
    for path in paths:
        mod = root
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        if isinstance(mod, torch.nn.ModuleList):
            return mod
    return None


def encoder_layers(tower: torch.nn.Module) -> torch.nn.ModuleList:
    layers = find_module_list(tower, ("vision_model.encoder.layers", "encoder.layers", "encoder.layer",
                                      "vision_model.encoder.layer"))
    if layers is None:
        raise TypeError(f"cannot find the encoder layers of {type(tower).__name__}")
    return layers


def attention_module(layer: torch.nn.Module) -> torch.nn.Module:
    for name in ("self_attn", "attention"):
        mod = getattr(layer, name, None)
        if mod is not None and hasattr(mod, "q_proj") and hasattr(mod, "k_proj"):
            return mod
    raise TypeError(f"cannot find a q_proj/k_proj attention module in {type(layer).__name__}")


def object_layer(tower: torch.nn.Module) -> torch.nn.Module:
    """The attention module of the tower's object-centric middle layer (the ``mid_attention`` signal): layer
    ``3 / 8 * depth`` rounded half up, in 1-based counting, at least the first (HiPrune's layer 9 of CLIP ViT-L's
    24)."""
    layers = encoder_layers(tower)
    return attention_module(layers[max(1, (3 * len(layers) + 4) // 8) - 1])


def has_cls_token(tower: torch.nn.Module) -> bool:
    emb = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
    return emb is not None and (hasattr(emb, "class_embedding") or hasattr(emb, "cls_token"))


def signal_layer(tower: torch.nn.Module, feature_layer: int | list[int]) -> torch.nn.Module:
    """The attention module of the layer whose output is ``hidden_states[feature_layer]`` (the last one if several):
    VisionZip/PruMerge read attention where the LLM's features are taken."""
    layers = encoder_layers(tower)
    fl = feature_layer if isinstance(feature_layer, int) else list(feature_layer)[-1]
    idx = fl % (len(layers) + 1) - 1
    if idx < 0:
        raise ValueError(f"feature layer {feature_layer} is the embedding output; no attention to read there")
    return attention_module(layers[idx])


def pool_patch_signals(results: dict[str, torch.Tensor], side: int, kernel: int) -> dict[str, torch.Tensor]:
    """Per-patch encoder signals (``cls_attention`` ``[B, P*P]``, ``keys`` ``[B, P*P, d]`` on a row-major ``P x P``
    patch grid, ``P = side * kernel``) averaged over ``kernel x kernel`` blocks, row-major: the signals of the
    ``side x side`` tokens a projector makes by pooling (Gemma 3's average pool) or by pixel shuffle (SmolVLM /
    Idefics3: token ``(r, c)`` holds the patches of block ``(r, c)``)."""
    out = {}
    p = side * kernel
    for name, t in results.items():
        b = t.shape[0]
        grid = t.reshape(b, p, p, -1).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(grid.float(), kernel).flatten(2).transpose(1, 2)
        out[name] = pooled.squeeze(-1) if t.dim() == 2 else pooled
    return out
