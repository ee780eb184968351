"""Stage "encoder" on the Qwen3-VL-like ViTs whose LLM token is one merge unit of 2x2 consecutive patches and whose
blocks take no mask: Qwen3-VL (``adapters/qwen3_vl.py``, with DeepStack taps), Qwen3.5 and GLM-4.1V
(``adapters/mrope_vl.py``).

The contract a ViT must meet (checked in the installed ``modeling_qwen3_vl.py`` / ``modeling_qwen3_5.py`` /
``modeling_glm4v.py``): ``visual.blocks`` are called as ``block(x, cu_seqlens=..., max_seqlen=...,
position_embeddings=(cos, sin))`` on ``[patches, D]`` with one attention segment per temporal grid and a per-patch
2-D rotary embedding; four consecutive patches (the ``get_vision_position_ids`` order) form one merge unit = one LLM
token; after the blocks a tail of the model's own modules maps the unit rows to LLM tokens (Qwen3-VL / Qwen3.5:
``visual.merger``; GLM: ``post_layernorm``, the 2x2 ``downsample`` convolution over each unit, ``merger``).

How (:class:`MergeUnitEncoderStage`, mixed into an adapter that has ``visual``, ``core``, ``merge`` and
``token_of``):

* **The unit is one merge unit**: the method compresses, per image / clip, its units' four patch states after block
  ``L - 1`` concatenated (``[N, 4 * D]``); a kept unit keeps its patches, merged units are averaged patch by patch
  (size-weighted, :class:`tokenzip.encoder.MergedTokens`). The vision attention takes no mask: no proportional
  attention, a merged unit is a plain average in the later blocks (as on Qwen2-VL).
* **The model's own pass up to the cut**: ``get_image_features`` / ``get_video_features`` run as the model runs them
  (GLM's video: one ``(1, h, w)`` grid per temporal grid) and are stopped after block ``L - 1`` by a forward hook;
  block 0's inputs give the per-patch rotary embedding (no copy of the embedding or position interpolation). The
  blocks after the cut are the model's block modules, called as the model calls them, on the kept units in the
  model's unit order (a merged unit at its representative's place: its rotary embedding and frame), one attention
  segment per temporal grid recomputed from the units left, then the adapter's tail (:meth:`_vision_tail`); the rows
  are put back in the method's slot order.
* **Intermediate taps** (:meth:`_vision_taps`; Qwen3-VL's DeepStack): a level tapped after block ``b <= L - 1`` is
  the tap module on all units, cut with the tokens' groups (:func:`cut_rows`); after block ``b >= L``: the tap module
  on the kept units after block ``b``.
* **Schedules** (``layer=(l1, l2, ...)``): the pass stops after block ``l1 - 1``; at each earlier cut the InEncoder's
  step compresses the units of the modalities it takes (``step.counts``: each item reaches its budget at the last
  cut), the levels tapped so far are cut like the units, and the blocks to the next cut run on the units left. After
  the first cut a method sees a 1-D layout; each token keeps the placeholder of the original unit it stands at
  (:meth:`_kept_slots`).
* **Signals** from block ``L - 1``: ``keys`` and ``cls_attention`` (as at the ViT's output, from the block's own
  ``qkv``), ``text`` / ``text_mask``. Not ``projected`` (the tail needs the last block's output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils.generic import get_max_seqlen

from .. import layout as L
from .. import ops
from ..callstate import per_call
from ..encoder import MergedTokens, check_cuts
from ..output import CompressOutput
from .attention import ATTENTION_SIGNALS
from .base import Item
from .placeholders import text_signals
from .probe import VisionBlockProbe

# inside the ViT the tail (merger) has not run yet: no ``projected``
ENCODER_SIGNALS = frozenset({"cls_attention", "keys", "text", "text_mask"})


class AtCut(Exception):
    """Stops the model's own ViT pass after the block before the cut."""


@dataclass
class VitPass:
    """One modality's ViT pass from the first cut to rebuild(): the blocks' rotary embedding ``pe`` (per patch) and
    each global unit's ``frame`` (its attention segment); per item its units' ``states``, the global unit each current
    unit stands at (``ids``: a merged unit at its representative) and its first global unit (``offsets``);
    ``levels[j]``: tap ``j``'s rows so far, per item over its current units."""

    pe: tuple[torch.Tensor, torch.Tensor]
    frame: torch.Tensor
    cu_dtype: torch.dtype
    states: list[MergedTokens]
    ids: list[torch.Tensor]
    offsets: list[int]
    levels: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def cut_rows(rows: torch.Tensor, out: CompressOutput, size: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[N, D]`` (one per input token) cut like the tokens: per output token the mean of its source group's
    rows, weighted by ``size`` (the input tokens each row already stands for; None: 1 each) — a kept token's own row
    exactly; a slot with no member: its representative's row."""
    means, count = ops.group_mean(rows, out.source[0].to(rows.device), out.tokens.shape[1], size)
    own = rows[out.index[0].to(rows.device)]
    return torch.where(count[:, None] > 0, means, own)


def _grouped_signals(probe: VisionBlockProbe, unit: int) -> dict[str, torch.Tensor]:
    """The probe's per-patch signals per merge unit: mean over the unit's patches."""
    return {name: t.reshape(t.shape[0] // unit, unit, *t.shape[1:]).mean(dim=1)
            for name, t in (("cls_attention", probe.received), ("keys", probe.keys)) if t is not None}


class MergeUnitEncoderStage:
    """Stage "encoder" (module doc). The adapter sets ``cuts`` / ``step`` to None in ``__init__``, routes
    ``encode`` to :meth:`_encode_in_vit` while ``cuts`` is set, keeps the placeholders of :meth:`_kept_slots` and
    takes the tokens (and tap rows) from :meth:`_finish_vit` in ``rebuild``; it overrides :meth:`_vision_taps` /
    :meth:`_vision_tail` where its ViT has taps or another tail."""

    encoder_signals = ENCODER_SIGNALS
    _tower = per_call(factory=dict)  # each modality's ViT pass between the cut and rebuild()
    cuts: tuple[int, ...] | None = None  # compress after these numbers of vision blocks
    step: Any = None  # a schedule's compression at the cuts before the last

    # ---- what differs between ViTs ------------------------------------------------------------------------------
    def _vision_taps(self) -> list[tuple[int, torch.nn.Module]]:
        """``(block, module)`` per intermediate tap: the module maps the unit rows after that block to one row per
        unit (Qwen3-VL: DeepStack)."""
        return []

    def _vision_tail(self, patches: torch.Tensor) -> torch.Tensor:
        """The model's modules after the blocks, on ``[4 * units, D]`` patch rows (consecutive fours = units): one
        LLM token per unit."""
        return self.visual.merger(patches)

    # ---- the stage ------------------------------------------------------------------------------------------------
    def encoder_depth(self) -> int:
        """The vision blocks (``tz.InEncoder`` layer forms resolve against it)."""
        return len(self.visual.blocks)

    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        cuts = check_cuts(layer, len(self.visual.blocks))  # ValueError naming the valid cuts
        if len(cuts) > 1 and step is None:
            raise ValueError("a schedule of encoder cuts needs a compression step for the intermediate cuts")
        self.cuts, self.step = cuts, step

    @torch.no_grad()
    def _encode_in_vit(self, kwargs: dict[str, Any], needs: frozenset[str], modality: str, grid: torch.Tensor,
                       sizes: list[int], owner: list[int]) -> list[Item]:
        """The model's own ViT pass of the modality, stopped after block ``cuts[0] - 1`` (its rotary embedding and
        segments, the taps so far), then, for a schedule, each earlier cut's compression and the blocks to the next
        cut; one item per image / clip whose tokens are its merge units at the last cut (the unit's four patch states
        concatenated)."""
        visual, cut = self.visual, self.cuts[0]
        pixels = kwargs["pixel_values" if modality == "image" else "pixel_values_videos"]
        box: dict[str, Any] = {}
        taps = self._vision_taps()
        tapped: dict[int, torch.Tensor] = {}

        def first(module: torch.nn.Module, args: tuple, kw: dict) -> None:
            box["pe"] = kw.get("position_embeddings", args[2] if len(args) > 2 else None)
            box["cu"] = kw.get("cu_seqlens", args[1] if len(args) > 1 else None)

        def stop(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            box["hidden"] = out
            raise AtCut

        def tap(level: int) -> Any:
            return lambda module, args, out: tapped.__setitem__(level, out)

        probe = VisionBlockProbe(visual.blocks[cut - 1].attn, needs & ATTENTION_SIGNALS)
        handles = [visual.blocks[0].register_forward_pre_hook(first, with_kwargs=True),
                   visual.blocks[cut - 1].register_forward_hook(stop)]
        handles += [m.register_forward_hook(tap(j)) for j, (b, m) in enumerate(taps) if b < cut - 1]
        if probe.needs:
            handles.append(probe.attn.register_forward_pre_hook(probe.hook, with_kwargs=True))
        features = self.core.get_image_features if modality == "image" else self.core.get_video_features
        try:
            features(pixels, grid.to(pixels.device), return_dict=True)
        except AtCut:
            pass
        finally:
            for h in handles:
                h.remove()
        hidden = box["hidden"]
        for j, (b, m) in enumerate(taps):
            if b == cut - 1:  # the tap of the block that made the units: the model's own module on them
                tapped[j] = m(hidden)
        unit = self.merge * self.merge
        units = hidden.view(-1, unit * hidden.shape[-1]).split(sizes)
        grouped = _grouped_signals(probe, unit)
        if "cls_attention" in grouped:  # sum over a segment's queries -> mean over them (one segment per grid)
            per_frame = (grid[:, 1] * grid[:, 2]).repeat_interleave(torch.tensor(sizes, device=grid.device))
            grouped["cls_attention"] = grouped["cls_attention"] / per_frame.to(grouped["cls_attention"])
        per_frame_units = (grid[:, 1] * grid[:, 2] // unit).repeat_interleave(grid[:, 0]).to(hidden.device)
        frame = torch.arange(per_frame_units.shape[0], device=hidden.device).repeat_interleave(per_frame_units)
        offsets = torch.tensor([0, *sizes], device=hidden.device).cumsum(0)[:-1].tolist()
        run = VitPass(pe=box["pe"], frame=frame, cu_dtype=box["cu"].dtype,
                      states=[MergedTokens.start(u.unsqueeze(0)) for u in units],
                      ids=[torch.arange(o, o + n, device=hidden.device) for o, n in zip(offsets, sizes)],
                      offsets=offsets, levels={j: list(rows.split(sizes)) for j, rows in tapped.items()})
        self._tower[modality] = run
        text = [text_signals(self.core.get_input_embeddings(), kwargs["input_ids"], kwargs.get("attention_mask"),
                             set(self.token_of.values()), owner[i]) if {"text", "text_mask"} & needs else {}
                for i in range(len(sizes))]
        signals = [{name: t[o: o + n] for name, t in grouped.items()} for o, n in zip(offsets, sizes)]
        layouts = [self._layout(t, h, w, modality) for t, h, w in grid.tolist()]
        takes = self.step is not None and modality in (getattr(self.step, "modalities", None) or (modality,))
        counts = [self.step.counts(n, len(self.cuts)) for n in sizes] if len(self.cuts) > 1 and takes else None
        for j in range(1, len(self.cuts)):  # a schedule's earlier cuts: each item a little, then the next span
            if counts is not None:
                for i in range(len(sizes)):
                    sig = {name: v.unsqueeze(0) for name, v in {**signals[i], **text[i]}.items()}
                    out = self.step(run.states[i].hidden, counts[i][j - 1], layouts[i], sig)
                    self._carry(run, i, out)
                    layouts[i] = L.grid(1, out.tokens.shape[1])  # the kept units no longer tile the grid
            signals = self._vit_span(run, self.cuts[j - 1], self.cuts[j], needs)
        items = []
        for i in range(len(sizes)):
            extra: dict[str, Any] = {"tokens_in": sizes[i]}
            if counts is not None:  # a schedule: the last cut reaches each item's budget
                extra["k"] = counts[i][-1]
            items.append(Item(modality, owner[i], run.states[i].hidden[0], layouts[i], {**signals[i], **text[i]},
                              extra=extra))
        return items

    def _carry(self, run: VitPass, i: int, out: CompressOutput) -> None:
        """Item ``i`` of ``run`` after one compression of its units: its tap rows cut like its units (size-weighted),
        its units' states (:meth:`MergedTokens.after`) and their representatives' global ids."""
        size = run.states[i].size[0]
        for rows in run.levels.values():
            rows[i] = cut_rows(rows[i], out, size)
        run.states[i] = run.states[i].after([out])
        run.ids[i] = run.ids[i][out.index[0].to(run.ids[i].device)]

    def _vit_span(self, run: VitPass, start: int, stop: int, needs: frozenset[str] | None
                  ) -> list[dict[str, torch.Tensor]]:
        """Blocks ``start .. stop - 1`` on every item's current units (one pass, as the model runs a modality): the
        units in the model's order (by global unit id), each at its representative's rotary embedding and frame, one
        attention segment per temporal grid of the units left; the taps in the span (their modules on the units);
        states updated in place, in each item's slot order. With ``needs``: each item's signals of block
        ``stop - 1``."""
        visual = self.visual
        unit = self.merge * self.merge
        ids = torch.cat(run.ids)
        patches = torch.cat([st.hidden[0] for st in run.states])
        order = torch.argsort(ids, stable=True)
        restore = torch.argsort(order)
        kept = ids[order]
        d = patches.shape[-1] // unit
        x = patches[order].reshape(-1, d)
        cos, sin = run.pe
        pe = tuple(t.view(-1, unit, t.shape[-1])[kept].flatten(0, 1) for t in (cos, sin))
        _, per_frame = torch.unique_consecutive(run.frame[kept], return_counts=True)
        cu = torch.nn.functional.pad((per_frame * unit).cumsum(0), (1, 0)).to(run.cu_dtype)
        taps = {b: (j, m) for j, (b, m) in enumerate(self._vision_taps())}
        split = [int(i.numel()) for i in run.ids]
        probe = VisionBlockProbe(visual.blocks[stop - 1].attn, (needs or frozenset()) & ATTENTION_SIGNALS)
        handle = probe.attn.register_forward_pre_hook(probe.hook, with_kwargs=True) if probe.needs else None
        try:
            for b in range(start, stop):
                x = visual.blocks[b](x, cu_seqlens=cu, max_seqlen=get_max_seqlen(cu, visual.config),
                                     position_embeddings=pe)
                if b in taps:
                    j, m = taps[b]
                    run.levels[j] = list(m(x)[restore].split(split))
        finally:
            if handle is not None:
                handle.remove()
        for st, rows in zip(run.states, x.view(-1, unit * d)[restore].split(split)):
            st.hidden = rows.unsqueeze(0).to(st.hidden.dtype)
        if needs is None:
            return []
        grouped = {name: t[restore] for name, t in _grouped_signals(probe, unit).items()}
        if "cls_attention" in grouped:  # mean over the patch queries of the unit's segment (its frame's units left)
            _, where, count = torch.unique(run.frame[ids], return_inverse=True, return_counts=True)
            grouped["cls_attention"] = grouped["cls_attention"] / (unit * count[where]).to(grouped["cls_attention"])
        parts = {name: t.split(split) for name, t in grouped.items()}
        return [{name: parts[name][i] for name in parts} for i in range(len(split))]

    def _kept_slots(self, item: Item, out: CompressOutput, i: int) -> torch.Tensor:
        """The placeholders (within the item's run; ``i``: the item's index among its modality's) of ``out``'s
        tokens: its representatives' (``index``); after a schedule of cuts, the original units they stand at."""
        run = self._tower.get(item.modality) if self.cuts is not None else None
        if run is None:
            return out.index[0]
        return run.ids[i][out.index[0].to(run.ids[i].device)] - run.offsets[i]

    @torch.no_grad()
    def _finish_vit(self, modality: str, outputs: list[CompressOutput]
                    ) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
        """The blocks after the last cut on every item's kept/merged units (:meth:`_vit_span`), the tail, and every
        tap (before the cut: cut like the tokens; after it: on the kept units). Per item its tokens and rows in the
        method's slot order."""
        run = self._tower[modality]
        for i, out in enumerate(outputs):
            self._carry(run, i, out)
        self._vit_span(run, self.cuts[-1], len(self.visual.blocks), None)
        d = run.states[0].hidden.shape[-1] // (self.merge * self.merge)
        feats = tuple(self._vision_tail(st.hidden[0].reshape(-1, d)) for st in run.states)
        levels = [tuple(run.levels[j]) for j in range(len(self._vision_taps()))]
        return feats, levels
