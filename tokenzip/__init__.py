"""tokenzip: training-free token compression for multimodal LLMs.

    import tokenzip as tz
    with tz.get("visionzip", retain=0.25)(model):
        out = model.generate(**inputs)
"""

from __future__ import annotations

from .adapters import supported_models
from .base import Compressor, MethodInfo
from .budget import Budget
from .compose import Composed, compose
from .encoder_stage import InEncoder
from .methods import *  # noqa: F401,F403  (method classes)
from .methods import METHODS, FitPruneRecipe
from .output import CompressOutput, ItemStats, ModalityStats
from .per_frame import PerFrame as PerFrame  # tz.PerFrame(method): an image method frame by frame
from .registry import get, method_class, methods

__version__ = "0.1.0"

# imported on first use (``tokenzip.zoo.load(...)``, ``tokenzip.preview.kept_items(...)``) so ``import tokenzip``
# stays light
_LAZY_MODULES = ("zoo", "preview", "data", "long_video")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Budget", "Composed", "CompressOutput", "Compressor", "FitPruneRecipe", "InEncoder", "ItemStats", "METHODS",
           "MethodInfo", "ModalityStats", "PerFrame", "compose", "get", "method_class", "methods",
           "supported_models"] + [cls.__name__ for cls in METHODS]
