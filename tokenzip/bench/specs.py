"""Method specs the bench (image sweep and audio WER sweep) and ``tokenzip show`` accept, parsed in one place.

    NAME                   a registered method:                         tz.get(NAME, retain=r)
    NAME@encoderL          the same inside the encoder, cut after L:    tz.InEncoder(tz.get(NAME, retain=r), layer=L)
    NAME@encoderL1+L2+...  a schedule of cuts (increasing layer counts): tz.InEncoder(..., layer=(L1, L2, ...))

Registered stage-``"encoder"`` methods are plain ``NAME``s (they carry their own layer).
"""

from __future__ import annotations

from typing import Any

from ..base import Compressor, MethodInfo

SPEC_HELP = "NAME, NAME@encoderL or NAME@encoderL1+L2+... (L: encoder layers run before the cut)"


def parse_spec(spec: str) -> tuple[str, int | tuple[int, ...] | None]:
    """``"tome@encoder6"`` -> ``("tome", 6)``; ``"tome@encoder1+2+3"`` -> ``("tome", (1, 2, 3))``;
    ``"tome"`` -> ``("tome", None)``. ValueError for any other ``@`` suffix."""
    if not isinstance(spec, str):
        raise TypeError(f"method spec must be a str, got {type(spec).__name__}")
    name, at, where = spec.strip().partition("@")
    if not at:
        return name, None
    body = where[len("encoder"):] if where.startswith("encoder") else ""
    parts = body.split("+")
    if not name or not body or not all(p.isdigit() for p in parts):
        raise ValueError(f"method {spec!r}: write {SPEC_HELP}")
    cuts = tuple(int(p) for p in parts)
    return name, cuts[0] if len(cuts) == 1 else cuts


def make_method(spec: str, retain: float | None = None, tokens: int | None = None, **params: Any) -> Compressor:
    """A configured compressor for ``spec`` (see the module docstring): ``"atome"`` -> ``tz.get("atome", ...)``;
    ``"atome@encoder2"`` -> the same inside the encoder, cut after 2 layers (``tz.InEncoder``)."""
    import tokenzip as tz

    name, cuts = parse_spec(spec)
    budget = {k: v for k, v in (("retain", retain), ("tokens", tokens)) if v is not None}
    method = tz.get(name, **budget, **params)
    if cuts is None:
        return method
    return tz.InEncoder(method, layer=cuts)


class MethodSpec:
    """A method spec used where the sweep expects a method class: ``spec(retain=r)`` builds the compressor and
    ``spec.info`` is the :class:`tokenzip.MethodInfo` of what it builds (stage ``"encoder"`` for ``NAME@encoderL``)."""

    def __init__(self, spec: str):
        self.spec = spec.strip()
        self.info: MethodInfo = make_method(self.spec, 0.5).info  # ValueError/TypeError for a bad spec, up front

    def __call__(self, retain: float | None = None, tokens: int | None = None) -> Compressor:
        return make_method(self.spec, retain=retain, tokens=tokens)

    def __repr__(self) -> str:
        return f"MethodSpec({self.spec!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, MethodSpec) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


def resolve(spec: str | type[Compressor] | MethodSpec) -> type[Compressor] | MethodSpec:
    """A registered method's class for a plain name, a :class:`MethodSpec` for ``NAME@encoder...``; classes and
    specs pass through."""
    from ..registry import method_class

    if isinstance(spec, str):
        return MethodSpec(spec) if "@" in spec else method_class(spec)
    if isinstance(spec, MethodSpec) or (isinstance(spec, type) and issubclass(spec, Compressor)):
        return spec
    raise TypeError(f"methods must be names, NAME@encoderL specs or Compressor subclasses, got {spec!r}")
