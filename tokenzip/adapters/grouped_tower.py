"""Stage "encoder" for a ViT without [CLS] whose LLM tokens are fixed groups of its patches, formed after the tower:
Gemma 3 (``k x k`` average pool, 64x64 patches -> 16x16 tokens) and SmolVLM / Idefics3 (``s x s`` pixel shuffle).
The blocks both adapters share (``adapters/gemma3.py``, ``adapters/smolvlm.py``); the runner is
:class:`tokenzip.encoder.EncoderRunner` (the tower's own embedding, layers and final norm).

* **The unit is one group** (one LLM token): a budget is in LLM tokens, so a cut inside the tower compresses whole
  groups, as InternVL's does for its 2x2 pixel shuffle. ``groups`` ``[U, g]`` lists the patches (row-major over the
  tower's ``P x P`` grid) of each of the ``U`` tokens the projector makes, in the projector's token order: the
  average pool's windows, or the model's own ``pixel_shuffle`` run on an index map.
* **Candidates** at a cut: each group's ``g`` patch states concatenated, ``[U, g * D]`` per image / tile, layout the
  ``side x side`` token grid. Selecting a group keeps its ``g`` patches; merging groups averages them patch by patch
  (ToMe's size-weighted ``merge_wavg``, :class:`tokenzip.encoder.MergedTokens`), so a merged group is still ``g``
  patches, each standing for ``size`` groups.
* **Later layers** run per image on its kept groups' patches (one row each, padded when counts differ) with ToMe's
  proportional attention (``log size`` per patch, an additive mask the SigLIP layers take as they are).
* **Back to LLM tokens**: after the last layer and the tower's final norm, each kept group's patches are put back at
  the patch positions of token slot ``j`` (``groups[j]``) of an otherwise empty ``P x P`` grid and the model's own
  projector runs on it (pool or shuffle, norm, projection: no copy of it); output token ``j`` is the ``j``-th kept
  group's token. The layout, [CLS]-free attention and positions are the model's: nothing is re-derived.
* **Signals** at a cut come from the layer before it (the one that made the tokens): ``cls_attention`` (attention
  received, mean over heads and over the row's queries) and ``keys`` (mean over heads), recomputed from its q/k on
  the row's real patches (:func:`tokenzip.adapters.attention.attention_signals`), averaged over each group's
  patches, as at the tower's output.
* **Schedules** (``layer=(l1, l2, ...)``): the groups are compressed at each earlier cut by the InEncoder's step
  (``step.counts``), sizes carry from cut to cut; after the first cut a method sees a 1-D layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import layout as L
from ..encoder import EncoderRunner, EncoderSpec, MergedTokens
from ..encoder.runner import padded_rows
from ..output import CompressOutput
from .attention import ATTENTION_SIGNALS, attention_signals
from .probe import capture_input


def block_groups(patches: int, kernel: int) -> torch.Tensor:
    """``[U, kernel**2]``: the patches (row-major over a ``patches x patches`` grid) of each ``kernel x kernel``
    block, blocks row-major: the windows of an average pool with stride ``kernel``."""
    side = patches // kernel
    rows = torch.arange(side)[:, None, None, None] * kernel + torch.arange(kernel)[None, None, :, None]
    cols = torch.arange(side)[None, :, None, None] * kernel + torch.arange(kernel)[None, None, None, :]
    return (rows * patches + cols).reshape(side * side, kernel * kernel)


def shuffle_groups(shuffle: Callable[[torch.Tensor], torch.Tensor], patches: int) -> torch.Tensor:
    """``[U, g]``: the patches the model's own pixel ``shuffle`` (``[1, P*P, 1]`` -> ``[1, U, g]``) stacks into each
    of its tokens, in channel order: the shuffle run on an index map."""
    ids = torch.arange(patches * patches, dtype=torch.float64).view(1, -1, 1)
    out = shuffle(ids)
    return out.reshape(out.shape[-2], -1).round().long()


@dataclass
class TowerImage:
    """One image / tile inside the tower between the cut and the projector."""

    state: MergedTokens  # [1, n, g * D] its current groups, their sizes and sources over its U groups
    valid: torch.Tensor  # [n, g] which of each group's patches are real (SmolVLM: False where a tile is padding)
    signals: dict[str, torch.Tensor] = field(default_factory=dict)

    def after(self, out: CompressOutput) -> "TowerImage":
        """The groups after one compression of them: :meth:`MergedTokens.after` (a kept group keeps its patches, a
        merged one is the size-weighted mean, patch by patch); a merged patch is real if any member's is, and where
        members' patches are padding, the mean is taken over the real ones only (padding never leaks into a real
        patch)."""
        state = self.state.after([out])
        step = out.source[0].to(self.valid.device)
        k = out.tokens.shape[1]
        keep = step >= 0
        valid = torch.zeros(k, self.valid.shape[1], dtype=torch.long, device=self.valid.device)
        valid.index_add_(0, step[keep], self.valid[keep].long())
        members = torch.bincount(step[keep], minlength=k)
        mixed = (members > 1) & (valid < members[:, None]).any(dim=1)  # a merge that involves padded patches
        if bool(mixed.any()):
            g = self.valid.shape[1]
            d = self.state.hidden.shape[-1] // g
            patches = self.state.hidden[0, keep].view(-1, g, d).float()
            weight = self.state.size[0, keep].to(patches.device).float()[:, None] * self.valid[keep].float()
            sums = torch.zeros(k, g, d, device=patches.device).index_add_(0, step[keep], patches * weight[..., None])
            mass = torch.zeros(k, g, device=patches.device).index_add_(0, step[keep], weight)
            mean = (sums / mass.clamp(min=1e-12)[..., None]).to(state.hidden.dtype)
            current = state.hidden[0].view(k, g, d)
            fixed = torch.where((mixed[:, None] & (mass > 0))[..., None], mean, current)
            state = MergedTokens(fixed.reshape(1, k, g * d), state.size, state.source)
        return TowerImage(state, valid > 0, {})


class GroupedTower:
    """The encoder stage of a tower whose tokens are groups of patches (module doc)."""

    def __init__(self, spec: EncoderSpec, cuts: int | tuple[int, ...], groups: torch.Tensor,
                 project: Callable[[torch.Tensor], torch.Tensor], side: int):
        self.runner = EncoderRunner(spec, cuts)  # ValueError naming the valid cuts
        self.groups = groups
        self.project = project  # [B, P*P, D] the tower's normed output -> [B, U, D_llm] (the model's projector)
        self.side = side

    @property
    def cuts(self) -> tuple[int, ...]:
        return self.runner.cuts

    @staticmethod
    def _signals(attn: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor, needs: frozenset[str]
                 ) -> dict[str, torch.Tensor]:
        """Per-group signals ``[n(, d)]`` of one row's patches ``x`` ``[n * g, D]`` (group-major), over its real
        patches ``valid`` ``[n, g]`` (padding: 0, as at the tower's output)."""
        wanted = frozenset(needs & ATTENTION_SIGNALS)
        if not wanted:
            return {}
        n, g = valid.shape
        flat = valid.flatten().to(x.device)
        out = {}
        for name, t in attention_signals(attn, x[flat].unsqueeze(0), wanted, None).items():
            full = t.new_zeros(n * g, *t.shape[2:]).float()
            full[flat] = t[0].float()
            out[name] = full.view(n, g, *t.shape[2:]).mean(dim=1)
        return out

    @staticmethod
    def _rows(images: list[TowerImage], d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each image's patches as one row (group-major), padded, with the additive mask: ``log size`` on real
        patches (proportional attention), the dtype's minimum on padding patches and the rows' filler."""
        rows = [im.state.hidden[0].reshape(-1, d) for im in images]
        g = images[0].valid.shape[1]
        sizes = [im.state.size[0].repeat_interleave(g) for im in images]
        hidden, mask = padded_rows(rows, sizes)
        if all(bool(im.valid.all()) for im in images):
            return hidden, mask
        if mask is None:
            mask = hidden.new_zeros(hidden.shape[0], 1, 1, hidden.shape[1])
        low = torch.finfo(hidden.dtype).min
        for r, im in enumerate(images):
            invalid = ~im.valid.flatten().to(mask.device)
            mask[r, 0, 0, : invalid.numel()] = mask[r, 0, 0, : invalid.numel()].masked_fill(invalid, low)
        return hidden, mask

    def _span(self, images: list[TowerImage], start: int, stop: int, needs: frozenset[str] | None, d: int) -> None:
        """Layers ``start .. stop - 1`` on every image's groups (states updated in place); with ``needs``, each
        image's signals of layer ``stop - 1`` on its real patches."""
        runner = self.runner
        hidden, mask = self._rows(images, d)
        if needs is None or not (needs & ATTENTION_SIGNALS):
            hidden = runner.run(hidden, start, stop, mask)
            box: dict[str, torch.Tensor] = {}
        else:
            hidden = runner.run(hidden, start, stop - 1, mask)
            with capture_input(runner.span_attention(stop)) as box:
                hidden = runner.run(hidden, stop - 1, stop, mask)
        for r, im in enumerate(images):
            n, width = im.state.hidden.shape[1:]
            real = n * (width // d)
            im.state = MergedTokens(hidden[r, :real].reshape(1, n, width).to(im.state.hidden.dtype), im.state.size,
                                    im.state.source)
            if needs is not None:
                im.signals = self._signals(runner.span_attention(stop), box["x"][r, :real], im.valid, needs) \
                    if "x" in box else {}

    @torch.no_grad()
    def encode(self, hidden: torch.Tensor, valid: torch.Tensor | None, needs: frozenset[str], step: Any = None,
               extra_signals: Callable[[int], dict[str, torch.Tensor]] | None = None
               ) -> tuple[list[TowerImage], list[L.Layout], list[int] | None]:
        """The tower's layers up to the (last) cut on its embedded images ``hidden`` ``[B, P*P, D]`` (``valid``
        ``[B, P*P]``: the real patches, None: all; padding patches are masked as keys, as the model masks them),
        compressing at the earlier cuts of a schedule with ``step``; ``extra_signals(i)``: image ``i``'s other signals
        (text) for the step. Returns each image's groups at the cut, their layouts and, for a schedule, the counts
        per cut."""
        runner = self.runner
        d = hidden.shape[-1]
        groups = self.groups.to(hidden.device)
        valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if valid is None \
            else valid.to(hidden.device).bool()
        images = [TowerImage(MergedTokens.start(hidden[i, groups].flatten(1).unsqueeze(0)), valid[i, groups])
                  for i in range(hidden.shape[0])]
        # the first span on the whole grids (raster order, the model's own mask for padding patches)
        mask = None if bool(valid.all()) else hidden.new_zeros(hidden.shape[0], 1, 1, hidden.shape[1]).masked_fill(
            ~valid[:, None, None, :], torch.finfo(hidden.dtype).min)
        cut = self.cuts[0]
        hidden = runner.run(hidden, 0, cut - 1, mask)
        with capture_input(runner.span_attention(cut)) as box:
            hidden = runner.run(hidden, cut - 1, cut, mask)
        for i, im in enumerate(images):
            im.state = MergedTokens.start(hidden[i, groups].flatten(1).unsqueeze(0))
            im.signals = self._signals(runner.span_attention(cut), box["x"][i, groups.flatten()], im.valid, needs)
        n = groups.shape[0]
        counts = step.counts(n, len(self.cuts)) if step is not None and len(self.cuts) > 1 else None
        layouts = [L.grid(self.side, self.side)] * len(images)
        for j in range(1, len(self.cuts)):
            for i, im in enumerate(images):
                sig = {**im.signals, **(extra_signals(i) if extra_signals is not None else {})}
                out = step(im.state.hidden, counts[j - 1], layouts[i], {k: v.unsqueeze(0) for k, v in sig.items()})
                images[i] = im.after(out)
                layouts[i] = L.grid(1, out.tokens.shape[1])
            self._span(images, self.cuts[j - 1], self.cuts[j], needs, d)
        return images, layouts, counts

    @torch.no_grad()
    def finish(self, images: list[TowerImage], outputs: list[CompressOutput], d: int) -> list[torch.Tensor]:
        """The layers after the last cut on each image's kept/merged groups, the final norm and the model's own
        projector: per image its LLM tokens ``[k, D_llm]`` in the method's slot order (module doc)."""
        images = [im.after(out) for im, out in zip(images, outputs)]
        runner = self.runner
        self._span(images, self.cuts[-1], len(runner.spec.layers), None, d)
        groups = self.groups
        patches = groups.numel()
        canvas = images[0].state.hidden.new_zeros(len(images), patches, d)
        for i, im in enumerate(images):
            k = im.state.hidden.shape[1]
            at = groups[:k].to(canvas.device).flatten()
            canvas[i, at] = im.state.hidden[0].reshape(-1, d)
        if runner.spec.final_norm is not None:
            canvas = runner.spec.final_norm(canvas)
        projected = self.project(canvas)
        return [projected[i, : im.state.hidden.shape[1]] for i, im in enumerate(images)]
