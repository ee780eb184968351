"""One explicit timing context for work that a benchmark must attribute to a stage it cannot see from outside.

Code that computes a method's signals inside the encoder's forward (attention rows recomputed from q/k, keys)
wraps that work in ``span("signals")``; a benchmark that wants the split installs a recorder with
``recording(callback)``. Without a recorder a span costs one context-variable read. Nothing is patched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_recorder: ContextVar[Callable[[str], Callable[[], None]] | None] = ContextVar("tokenzip_timing", default=None)


@contextmanager
def span(kind: str) -> Iterator[None]:
    """Mark the enclosed work as ``kind`` (e.g. ``"signals"``) for the active recorder, if any."""
    start = _recorder.get()
    if start is None:
        yield
        return
    stop = start(kind)
    try:
        yield
    finally:
        stop()


@contextmanager
def recording(start: Callable[[str], Callable[[], None]]) -> Iterator[None]:
    """While open, every :func:`span` calls ``start(kind)`` on entry and the function it returned on exit."""
    token = _recorder.set(start)
    try:
        yield
    finally:
        _recorder.reset(token)
