"""Pictures of what a compressor did to an image's patch tokens.

``overlay`` draws one result: patches that reach the LLM as themselves are bright with a thin outline, dropped
patches are dimmed, and every merged group (an output token made of several patches) gets its own colour, with a dot
on its representative patch. ``compare`` puts several results side by side in one figure.

Results can be given as :class:`tokenzip.ItemStats` (what ``compressor.last_stats`` records), as a
:class:`tokenzip.CompressOutput` (sample 0) or as a raw ``source`` tensor ``[N]`` (output slot of each token, ``-1``
dropped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .output import CompressOutput, ItemStats

# well separated colours for merged groups (matplotlib's tab10 + a few), assigned so that touching groups differ
_PALETTE_NAME = "tab10"


def _source_and_grid(result: Any, grid: Any) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
    if isinstance(result, ItemStats):
        source = result.source
        grid = grid if grid is not None else result.grid
    elif isinstance(result, CompressOutput):
        source = result.source[0]
    elif isinstance(result, (torch.Tensor, np.ndarray, list, tuple)):
        source = result
    else:
        raise TypeError("result must be an ItemStats, a CompressOutput or a source tensor [N], "
                        f"got {type(result).__name__}")
    src = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source).astype(np.int64)
    if src.ndim != 1:
        raise ValueError(f"source must be 1-D [N] (one item), got shape {tuple(src.shape)}")
    if grid is not None:
        if len(grid) == 2 and all(isinstance(v, (int, np.integer)) for v in grid):
            grid = [tuple(grid)]
        grid = [(int(h), int(w)) for h, w in grid]
    return src, grid


def _image_grid(src: np.ndarray, grid: list[tuple[int, int]] | None) -> tuple[np.ndarray, int, int]:
    """The part of ``source`` laid out on the picture: the largest 2-D grid of the layout (a LLaVA CLS token or
    an image-newline column is not drawn)."""
    n = src.shape[0]
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot infer a 2-D grid for {n} tokens; pass grid=(h, w)")
        grid = [(side, side)]
    if sum(h * w for h, w in grid) != n:
        raise ValueError(f"grid {grid} does not tile {n} tokens")
    best = max(range(len(grid)), key=lambda i: grid[i][0] * grid[i][1])
    offset = sum(h * w for h, w in grid[:best])
    h, w = grid[best]
    return src[offset: offset + h * w].reshape(h, w), h, w


def _group_colours(cells: np.ndarray, sizes: dict[int, int], n_colours: int) -> dict[int, int]:
    """Greedy colouring of the merged groups: each group takes the least used colour none of its 4-neighbours has."""
    h, w = cells.shape
    neighbours: dict[int, set[int]] = {g: set() for g in sizes if sizes[g] > 1}
    for dy, dx in ((0, 1), (1, 0)):
        a = cells[: h - dy, : w - dx]
        b = cells[dy:, dx:]
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
            if x != y and x in neighbours and y in neighbours:
                neighbours[x].add(y)
                neighbours[y].add(x)
    colour: dict[int, int] = {}
    used = [0] * n_colours
    for g in sorted(neighbours):
        taken = {colour[o] for o in neighbours[g] if o in colour}
        free = [c for c in range(n_colours) if c not in taken] or list(range(n_colours))
        c = min(free, key=lambda c: (used[c], c))
        colour[g] = c
        used[c] += 1
    return colour


def overlay(image: Image.Image | np.ndarray, result: Any, grid: Any = None, *, dim: float = 0.75,
            tint: float = 0.5, title: str | None = None, size: int | None = 448, outline: bool = True,
            ax: Any = None) -> Image.Image | None:
    """Draw which patches of ``image`` were kept, merged or dropped.

    image: the picture the encoder saw (e.g. :func:`pixels_to_image` of ``pixel_values``); it is stretched over the
        token grid. result: ``ItemStats`` / ``CompressOutput`` / ``source`` ``[N]``. grid: ``(h, w)`` or a layout
        list (taken from ``ItemStats`` when omitted; square when ``N`` is a perfect square).
    dim: how much dropped patches are darkened (0..1). tint: opacity of a merged group's colour (0..1).
    size: longest side of the returned picture in pixels (None: the image's own size).
    ax: draw into this matplotlib Axes and return None, instead of returning a new PIL image.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim must be in [0, 1], got {dim}")
    if not 0.0 <= tint <= 1.0:
        raise ValueError(f"tint must be in [0, 1], got {tint}")
    src, grid = _source_and_grid(result, grid)
    cells, gh, gw = _image_grid(src, grid)
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    if size is not None:
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    pix = np.asarray(img).astype(np.float32) / 255.0
    H, W = pix.shape[:2]
    rows = np.minimum((np.arange(H) * gh) // H, gh - 1)
    cols = np.minimum((np.arange(W) * gw) // W, gw - 1)
    cell_of_px = cells[rows[:, None], cols[None, :]]  # [H, W] output slot of each pixel's patch

    slots, counts = np.unique(src[src >= 0], return_counts=True)
    sizes = dict(zip(slots.tolist(), counts.tolist()))
    palette = plt.get_cmap(_PALETTE_NAME).colors
    colour = _group_colours(cells, sizes, len(palette))
    out = pix.copy()
    out[cell_of_px < 0] *= 1.0 - dim
    for g, c in colour.items():
        m = cell_of_px == g
        out[m] = (1.0 - tint) * out[m] + tint * np.asarray(palette[c], dtype=np.float32)

    own_fig = ax is None
    if own_fig:
        dpi = 100
        fig = plt.figure(figsize=(W / dpi, (H + (28 if title else 0)) / dpi), dpi=dpi)
        ax = fig.add_axes((0, 0, 1, H / (H + (28 if title else 0))))
    ax.imshow(np.clip(out, 0, 1), extent=(0, gw, gh, 0), interpolation="nearest")
    ax.set_xlim(0, gw)
    ax.set_ylim(gh, 0)
    ax.axis("off")
    if outline:
        lw = max(0.4, min(1.5, 24.0 / max(gh, gw)))
        boxes = [Rectangle((x + 0.04, y + 0.04), 0.92, 0.92) for y in range(gh) for x in range(gw)
                 if cells[y, x] >= 0 and sizes.get(int(cells[y, x]), 0) == 1]
        if boxes:
            ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="#ffd400", linewidth=lw))
    # representative patch of each merged group
    reps = _representatives(result, src)
    if reps is not None:
        h0 = _grid_offset(src, grid)
        ys, xs = [], []
        for g, pos in reps.items():
            if sizes.get(g, 0) > 1 and h0 <= pos < h0 + gh * gw:
                ys.append((pos - h0) // gw + 0.5)
                xs.append((pos - h0) % gw + 0.5)
        if xs:
            ax.scatter(xs, ys, s=max(2.0, 180.0 / max(gh, gw)), c="white", edgecolors="black", linewidths=0.4)
    if title:
        ax.set_title(title, fontsize=9)
    if not own_fig:
        return None
    fig.canvas.draw()
    pic = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return pic


def _grid_offset(src: np.ndarray, grid: list[tuple[int, int]] | None) -> int:
    if not grid:
        return 0
    best = max(range(len(grid)), key=lambda i: grid[i][0] * grid[i][1])
    return sum(h * w for h, w in grid[:best])


def _representatives(result: Any, src: np.ndarray) -> dict[int, int] | None:
    """slot -> representative input position (``index``), when the result carries it."""
    index = None
    if isinstance(result, ItemStats):
        index = result.index
    elif isinstance(result, CompressOutput):
        index = result.index[0]
    if index is None:
        return None
    return {slot: int(pos) for slot, pos in enumerate(index.detach().cpu().tolist())}


def legend_text(result: Any) -> str:
    """``kept 48 / merged 16 groups / dropped 192`` style summary of a result."""
    src, _ = _source_and_grid(result, None)
    slots, counts = np.unique(src[src >= 0], return_counts=True)
    merged = int((counts > 1).sum())
    return (f"{len(slots)} tokens: {len(slots) - merged} kept, {merged} merged groups, "
            f"{int((src < 0).sum())} dropped")


def compare(image: Image.Image | np.ndarray, results: Sequence[tuple[str, Any]], grid: Any = None, *,
            ncols: int | None = None, title: str | None = None, panel: float = 2.6, show_original: bool = True,
            **kw: Any) -> Image.Image:
    """Several results on the same image side by side (one panel each, titled with the given names), plus the
    original picture first. Returns a PIL image."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    results = list(results)
    if not results:
        raise ValueError("results is empty: give at least one (name, result) pair")
    n = len(results) + (1 if show_original else 0)
    ncols = ncols or min(n, 6)
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols, panel * nrows + (0.5 if title else 0.1)),
                             squeeze=False, dpi=100, layout="constrained")
    flat = list(axes.ravel())
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if show_original:
        ax = flat.pop(0)
        ax.imshow(img)
        ax.set_title("input", fontsize=9)
        ax.axis("off")
    for (name, result), ax in zip(results, flat):
        overlay(img, result, grid, ax=ax, title=name, **kw)
    for ax in flat[len(results):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.canvas.draw()
    pic = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return pic


def pixels_to_image(pixel_values: torch.Tensor, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> Image.Image:
    """Undo a processor's normalisation of one ``[3, H, W]`` image: the picture the encoder actually saw."""
    x = pixel_values.detach().float().cpu()
    if x.dim() == 4:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"pixel_values must be [3, H, W] (or [1, 3, H, W]), got {tuple(pixel_values.shape)}")
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


__all__ = ["compare", "legend_text", "overlay", "pixels_to_image"]
