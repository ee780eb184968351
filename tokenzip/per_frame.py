"""``tz.PerFrame(method)``: run an image method on every frame of a clip, each frame with its share of the budget."""

from __future__ import annotations

from typing import Any

import torch

from . import ops
from .base import SIGNALS, Compressor, MethodInfo
from .layout import Layout, Segment
from .output import CompressOutput


def frame_parts(layout: Layout) -> list[tuple[int, Segment]]:
    """``(start, one-frame segment)`` of every frame of every segment, in token order (markers included)."""
    out, start = [], 0
    for s in layout.segments:
        for _ in range(s.t):
            out.append((start, Segment(s.kind, 1, s.h, s.w, s.newline)))
            start += s.h * s.w
    return out


class PerFrame(Compressor):
    """Compress a clip frame by frame with a pre-LLM image method (name ``<method>@frames``).

        with tz.PerFrame(tz.ToMe(retain=0.25))(model): ...

    The wrapped method's budget counts the whole item, as every budget does: ``k = budget.count(N)`` tokens of the
    clip reach the LLM. They are shared by the frames in proportion to their size with largest remainders
    (:func:`tokenzip.ops.split_budget`: equal frames get equal counts; the remainder goes to the earliest frames;
    every frame keeps at least one token while ``k`` allows), so the counts sum to exactly ``k``. Each frame is then
    compressed alone by the method, as if it were an image of that grid: per-token signals (``keys``,
    ``cls_attention``, ...) are cut to the frame, the others (``text``, ``text_mask``) are passed whole. Frames that
    get no token are dropped (only when ``k`` is below the frame count). LLaVA-OneVision's standalone newline token
    is not a frame: it is kept as it is while ``k`` leaves a token for the frames.

    Any layout works (an AnyRes image's base view and crop grid are two frames); with a single frame it is the
    method itself.
    """

    def __init__(self, method: Compressor):
        if not isinstance(method, Compressor) or isinstance(method, PerFrame):
            raise TypeError(f"method must be a configured pre-LLM compressor (e.g. tz.ToMe(retain=0.25)), got "
                            f"{type(method).__name__}")
        if method.info.stage != "pre_llm":
            raise ValueError(f"{method.info.name} works at stage {method.info.stage!r}; only pre-LLM methods can "
                             f"run frame by frame")
        if "image" not in method.info.modalities and "video" not in method.info.modalities:
            raise ValueError(f"{method.info.name} compresses {list(method.info.modalities)}; PerFrame needs a "
                             f"method for images")
        self.method = method
        self.retain, self.tokens = method.retain, method.tokens
        self.budget = method.budget
        self.last_stats = []
        self.requires = method.requires
        self.optional = method.optional
        i = method.info
        self.info = MethodInfo(name=f"{i.name}@frames", family=i.family, modalities=("image", "video"),
                               stage="pre_llm", query_aware=i.query_aware, reference=i.reference)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, d = tokens.shape
        markers, kv = ops.reserve_markers(layout, k)
        marker_set = set(markers)
        dropped = set(ops.marker_positions(layout)) - marker_set
        frames = [(s, seg) for s, seg in frame_parts(layout) if s not in marker_set and s not in dropped]
        alloc = ops.split_budget([seg.h * seg.w for _, seg in frames], kv)
        parts = [(s, seg, kk) for (s, seg), kk in zip(frames, alloc)] + [
            (m, Segment("newline", 1, 1, 1), 1) for m in markers]
        parts.sort(key=lambda p: p[0])
        out_tokens, out_index = [], []
        source = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
        base = 0
        for start, seg, kk in parts:
            size = seg.h * seg.w
            if kk == 0:
                continue
            piece = tokens[:, start: start + size]
            if kk >= size:  # the whole frame (or a kept marker) stays as it is
                out = ops.select(piece, torch.arange(size, device=tokens.device).expand(b, -1))
            else:
                sub = {name: (v[:, start: start + size] if SIGNALS[name].per_token else v)
                       for name, v in signals.items()}
                out = self.method.compress(piece, grid=Layout([seg]), k=kk, **sub)
            out_tokens.append(out.tokens)
            out_index.append(out.index + start)
            source[:, start: start + size] = torch.where(out.source >= 0, out.source + base, out.source)
            base += kk
        return CompressOutput(tokens=torch.cat(out_tokens, dim=1), source=source, index=torch.cat(out_index, dim=1))

    def __repr__(self) -> str:
        return f"PerFrame({self.method!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, PerFrame) and self.method == other.method
