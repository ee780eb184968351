"""Per-call state, kept per thread, so that one patched model can be called from several threads at once.

A patched call (``tokenzip/patch.py``) leaves state on shared objects between its stages: the adapter notes what
``generate()``'s own forward() calls no longer carry, the LLM-stage runner holds the prefill it is shortening, the
method records ``last_stats``. Such an attribute is declared on the class as a :class:`per_call` descriptor: each
thread reads and writes its own value (a call runs in one thread: its hooks run where the model runs), so two calls
in flight at once never see each other's state. ``published=True`` (``last_stats``): a thread that has not made a
call itself reads the value the most recent call anywhere wrote (e.g. a caller reading the stats of a
``generate()`` it ran in a worker thread, as a streaming UI does).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

_SLOT = "_tokenzip_per_call"


class _PerThread(threading.local):
    """One object's per-call values, one namespace per thread. A copy of the owner gets a fresh one."""

    def __reduce__(self) -> tuple:
        return (type(self), ())

    def __deepcopy__(self, memo: dict) -> "_PerThread":
        return type(self)()


def _values(obj: Any) -> _PerThread:
    d = obj.__dict__
    slot = d.get(_SLOT)
    if slot is None or slot[0] != id(obj):  # first use, or a copy.copy() of another object: its own namespace
        slot = (id(obj), _PerThread())
        d[_SLOT] = slot
    return slot[1]


class per_call:  # noqa: N801  (used like a field declaration)
    """A class attribute whose value belongs to the call in progress in the reading thread (module doc).

    ``default``: what a thread sees before it sets the attribute (``factory()`` instead, for a mutable default: each
    thread gets its own). ``published``: a thread that has not set it reads the latest value set by any thread."""

    def __init__(self, default: Any = None, *, factory: Callable[[], Any] | None = None, published: bool = False):
        self.default, self.factory, self.published = default, factory, published
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        values = _values(obj)
        try:
            return getattr(values, self.name)
        except AttributeError:
            pass
        if self.published and self.name in obj.__dict__:
            return obj.__dict__[self.name]
        value = self.factory() if self.factory is not None else self.default
        setattr(values, self.name, value)
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(_values(obj), self.name, value)
        if self.published:
            obj.__dict__[self.name] = value
