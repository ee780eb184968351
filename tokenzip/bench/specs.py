"""Method specs the bench (image sweep and audio WER sweep) and ``tokenzip show`` accept, parsed in one place.

    NAME                   a registered method:                         tz.get(NAME, retain=r)
    NAME@encoderL          the same inside the encoder, cut after L:    tz.InEncoder(tz.get(NAME, retain=r), layer=L)
    NAME@encoderL1+L2+...  a schedule of cuts (increasing layer counts): tz.InEncoder(..., layer=(L1, L2, ...))
    NAME@llmK              an LLM-stage method acting before decoder layer K: tz.get(NAME, retain=r, layer=K)
    A:F>B, A:F>B:G>C       a pipeline (bench sweeps): tz.compose(tz.get(A, retain=F), tz.get(B, retain=r / F))

Registered stage-``"encoder"`` methods are plain ``NAME``s (they carry their own layer). In a pipeline every part but
the last keeps a fixed fraction ``F`` of what it receives and the last part keeps ``r / (product of the F)``, so the
pipeline's nominal budget is the sweep's ``retain`` ``r`` (e.g. ``uniform_frames:0.5>dycoke`` at retain 0.1: half
the frames, then DyCoke keeps 0.2 of their tokens); parts are in pipeline order (input, then pre-LLM, then LLM) and
are plain ``NAME``s (an encoder-stage part's replay oracle would have to replay a whole pipeline: not supported).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..base import Compressor, MethodInfo

SPEC_HELP = ("NAME, NAME@encoderL or NAME@encoderL1+L2+... (L: encoder layers run before the cut) or NAME@llmK "
             "(an LLM-stage method's layer K)")


def parse_spec(spec: str) -> tuple[str, int | tuple[int, ...] | None]:
    """``"tome@encoder6"`` -> ``("tome", 6)``; ``"tome@encoder1+2+3"`` -> ``("tome", (1, 2, 3))``;
    ``"tome"`` -> ``("tome", None)``; ``"fastv@llm4"`` -> ``("fastv", None)`` (no encoder cut; its layer is
    :func:`llm_layer`'s). ValueError for any other ``@`` suffix."""
    if not isinstance(spec, str):
        raise TypeError(f"method spec must be a str, got {type(spec).__name__}")
    name, at, where = spec.strip().partition("@")
    if not at:
        return name, None
    if where.startswith("llm"):
        llm_layer(spec)  # ValueError for a malformed layer
        return name, None
    body = where[len("encoder"):] if where.startswith("encoder") else ""
    parts = body.split("+")
    if not name or not body or not all(p.isdigit() for p in parts):
        raise ValueError(f"method {spec!r}: write {SPEC_HELP}")
    cuts = tuple(int(p) for p in parts)
    return name, cuts[0] if len(cuts) == 1 else cuts


def llm_layer(spec: str) -> int | None:
    """``"fastv@llm4"`` -> ``4``; None for a spec without ``@llm``. ValueError for a layer that is not an int >= 1."""
    name, _, where = spec.strip().partition("@")
    if not where.startswith("llm"):
        return None
    body = where[len("llm"):]
    if not name or not body.isdigit() or int(body) < 1:
        raise ValueError(f"method {spec!r}: write {SPEC_HELP}")
    return int(body)


COMPOSE_HELP = "A:F>B (tz.compose: A keeps the fraction F of what it receives, B the rest of the budget)"


def parse_pipeline(spec: str) -> list[tuple[str, float | None]] | None:
    """``"uniform_frames:0.5>dycoke"`` -> ``[("uniform_frames", 0.5), ("dycoke", None)]``; None for a spec without
    ``>``. ValueError for a part without its fraction (every part but the last), a fraction outside (0, 1], a
    fraction on the last part or an ``@`` part."""
    if not isinstance(spec, str):
        raise TypeError(f"method spec must be a str, got {type(spec).__name__}")
    if ">" not in spec:
        return None
    parts = [p.strip() for p in spec.split(">")]
    out: list[tuple[str, float | None]] = []
    for i, part in enumerate(parts):
        name, colon, frac = part.partition(":")
        name, last = name.strip(), i == len(parts) - 1
        if not name or "@" in name or (not colon and not last) or (colon and last):
            raise ValueError(f"method {spec!r}: write {COMPOSE_HELP}")
        value = None
        if colon:
            try:
                value = float(frac)
            except ValueError:
                raise ValueError(f"method {spec!r}: the fraction of {name!r} must be a number in (0, 1], got {frac!r}")
            if not 0.0 < value <= 1.0:
                raise ValueError(f"method {spec!r}: the fraction of {name!r} must be in (0, 1], got {value:g}")
        out.append((name, value))
    return out


def _fixed(chain: list[tuple[str, float | None]]) -> float:
    out = 1.0
    for _, f in chain[:-1]:
        out *= float(f)
    return out


def make_method(spec: str, retain: float | None = None, tokens: int | None = None, **params: Any) -> Compressor:
    """A configured compressor for ``spec`` (see the module docstring): ``"atome"`` -> ``tz.get("atome", ...)``;
    ``"atome@encoder2"`` -> the same inside the encoder, cut after 2 layers (``tz.InEncoder``);
    ``"a:0.5>b"`` -> ``tz.compose(tz.get("a", retain=0.5), tz.get("b", retain=retain / 0.5))``."""
    import tokenzip as tz

    chain = parse_pipeline(spec)
    if chain is not None:
        if retain is None or tokens is not None or params:
            raise ValueError(f"method {spec!r}: a pipeline spec takes a retain budget only")
        rest = float(retain) / _fixed(chain)
        if rest > 1.0 + 1e-9:
            raise ValueError(f"method {spec!r}: retain {retain:g} is above what its fixed parts keep "
                             f"({_fixed(chain):g})")
        parts = [tz.get(n, retain=f) for n, f in chain[:-1]] + [tz.get(chain[-1][0], retain=min(1.0, rest))]
        if any(p.info.stage == "encoder" for p in parts):
            raise ValueError(f"method {spec!r}: pipelines with an encoder-stage part are not supported by the bench")
        return tz.compose(*parts)
    name, cuts = parse_spec(spec)
    layer = llm_layer(spec)
    if layer is not None:
        from ..registry import method_class

        cls = method_class(name)
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if cls.info.stage != "llm" or "layer" not in fields:
            raise ValueError(f"method {spec!r}: @llmK sets the decoder layer of an LLM-stage method with a `layer` "
                             f"parameter; {name!r} (stage {cls.info.stage!r}) has none")
        params = {**params, "layer": layer}
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
        chain = parse_pipeline(self.spec)
        probe = 0.5 * _fixed(chain) if chain is not None else 0.5  # a budget every part accepts
        self.info: MethodInfo = make_method(self.spec, probe).info  # ValueError/TypeError for a bad spec, up front
        if chain is not None or llm_layer(self.spec) is not None:  # rows are labelled with the spec (tz.compose's
            # "a+b" name drops the fractions; an @llmK method's own name drops its layer)
            self.info = dataclasses.replace(self.info, name=self.spec)

    def __call__(self, retain: float | None = None, tokens: int | None = None) -> Compressor:
        return make_method(self.spec, retain=retain, tokens=tokens)

    def __repr__(self) -> str:
        return f"MethodSpec({self.spec!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, MethodSpec) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


def resolve(spec: str | type[Compressor] | MethodSpec) -> type[Compressor] | MethodSpec:
    """A registered method's class for a plain name, a :class:`MethodSpec` for ``NAME@encoder...`` and pipelines
    ``A:F>B``; classes and specs pass through."""
    from ..registry import method_class

    if isinstance(spec, str):
        return MethodSpec(spec) if "@" in spec or ">" in spec else method_class(spec)
    if isinstance(spec, MethodSpec) or (isinstance(spec, type) and issubclass(spec, Compressor)):
        return spec
    raise TypeError(f"methods must be names, NAME@encoderL specs or Compressor subclasses, got {spec!r}")
