"""Looking methods up by name."""

from __future__ import annotations

import difflib

from .base import Compressor, MethodInfo


def _registry() -> dict[str, type[Compressor]]:
    from .methods import METHODS

    return {cls.info.name: cls for cls in METHODS}


def methods() -> list[MethodInfo]:
    """Every registered method's :class:`MethodInfo`."""
    return [cls.info for cls in _registry().values()]


def method_class(name: str) -> type[Compressor]:
    reg = _registry()
    if not isinstance(name, str):
        raise TypeError(f"method name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in reg:
        close = difflib.get_close_matches(key, list(reg), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}{hint} (known: {', '.join(sorted(reg))})")
    return reg[key]


def get(name: str, **kwargs) -> Compressor:
    """``tz.get("visionzip", retain=0.25)``: a configured compressor by name."""
    return method_class(name)(**kwargs)
