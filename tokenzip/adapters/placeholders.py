"""Media placeholders in the prompt, and shortening the prompt to the kept tokens: the building blocks every adapter
of a model with one placeholder token per media token uses (LLaVA, LLaVA-OneVision, Qwen-VL, Qwen2-Audio, ...)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .. import layout as L
from ..llm.adapter import placeholder_items
from .base import Item


def require_input_ids(kwargs: dict[str, Any]) -> torch.Tensor:
    ids = kwargs.get("input_ids")
    if ids is None:
        raise ValueError("tokenzip needs input_ids (not inputs_embeds) to locate the media placeholder tokens")
    return ids


def placeholder_keep_mask(input_ids: torch.Tensor, token_id: int, per_sample_counts: list[list[tuple[int, int]]]
                          ) -> torch.Tensor:
    """Keep mask over the sequence: text is kept; of item j's ``n`` placeholders (consecutive in placeholder order)
    only the first ``k`` are kept. ``per_sample_counts[b]`` lists ``(n, k)`` per item of sample ``b``."""
    keep = input_ids != token_id
    for b, counts in enumerate(per_sample_counts):
        pos = (input_ids[b] == token_id).nonzero().flatten()
        start = 0
        for n, k in counts:
            keep[b, pos[start: start + k]] = True
            start += n
    return keep


def image_llm_items(kwargs: dict[str, Any], token_id: int,
                    plan: Callable[[], tuple[list[int], list[Any] | None]]) -> list:
    """Each image's placeholder run in the LLM sequence (stage "llm"): after a pre-LLM method (``tz.compose``) the
    precomputed features' lengths, else the adapter's ``plan()`` of per-image token counts and grids."""
    input_ids = require_input_ids(kwargs)
    pre = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    if pre is not None:
        sizes, grids = [int(t.shape[0]) for t in pre.pooler_output], None
    elif kwargs.get("pixel_values") is not None:
        sizes, grids = plan()
    else:
        return []
    owners = items_per_sample(input_ids, token_id, sizes)
    return placeholder_items(input_ids, token_id, sizes, owners, "image", grids)


def items_per_sample(input_ids: torch.Tensor, token_id: int, sizes: list[int], what: str = "image") -> list[int]:
    """Which sample each item belongs to, from the placeholder counts; a clear error when they do not add up."""
    counts = (input_ids == token_id).sum(dim=1).tolist()
    owner: list[int] = []
    it = 0
    for b, c in enumerate(counts):
        while c > 0:
            if it >= len(sizes) or sizes[it] > c:
                break
            c -= sizes[it]
            owner.append(b)
            it += 1
        if c != 0:
            break
    if it != len(sizes) or len(owner) != len(sizes) or sum(counts) != sum(sizes):
        raise ValueError(
            f"the {what}s do not match the prompt: {len(sizes)} {what}(s) give {sum(sizes)} tokens "
            f"({sizes[:4]}{'...' if len(sizes) > 4 else ''}) but input_ids hold {sum(counts)} {what} placeholder "
            f"tokens per sample {counts}; build inputs with the model's processor")
    return owner


def text_signals(embed: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 media_token_ids: set[int], sample: int) -> dict[str, torch.Tensor]:
    """The prompt's text-token embeddings for one sample (media placeholders and padding excluded)."""
    ids = input_ids[sample]
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask[sample].bool()
    for t in media_token_ids:
        mask &= ids != t
    return {"text": embed(ids[mask]).detach(), "text_mask": torch.ones(int(mask.sum()), dtype=torch.bool,
                                                                      device=ids.device)}


def square_image_items(embed: torch.nn.Module, kwargs: dict[str, Any], token_id: int, feats: torch.Tensor,
                       owners: list[int], pooled: dict[str, torch.Tensor], side: int, needs: frozenset[str]
                       ) -> list[Item]:
    """One image item per row of ``feats`` ``[n, side * side, D]`` (an image, or a tile, of a fixed ``side x side``
    token grid; Gemma 3's images, SmolVLM's tiles), owned by sample ``owners[i]``: row ``i`` of each per-token
    signal in ``pooled``, and where ``needs`` asks, ``projected`` (the tokens) and the sample's ``text`` /
    ``text_mask`` (placeholders ``token_id`` excluded)."""
    grid = L.grid(side, side)
    items = []
    for i, b in enumerate(owners):
        sig = {name: t[i] for name, t in pooled.items()}
        if "projected" in needs:
            sig["projected"] = feats[i]
        if "text" in needs or "text_mask" in needs:
            sig.update(text_signals(embed, kwargs["input_ids"], kwargs.get("attention_mask"), {token_id}, b))
        items.append(Item("image", b, feats[i], grid, sig))
    return items


def padding_side(attention_mask: torch.Tensor | None) -> str:
    if attention_mask is None:
        return "left"
    if bool((attention_mask[:, -1] == 0).any()) and not bool((attention_mask[:, 0] == 0).any()):
        return "right"
    return "left"


def shrink_sequences(kwargs: dict[str, Any], keep: torch.Tensor, pad_token_id: int,
                     seq_keys: tuple[str, ...] = ("labels", "token_type_ids", "mm_token_type_ids")) -> dict[str, Any]:
    """Drop the positions where ``keep`` ``[B, L]`` is False from ``input_ids``, ``attention_mask`` and the other
    per-position tensors, re-padding on the side the batch was padded on. 2-D ``position_ids`` are renumbered from
    the new mask (positions are contiguous again after pre-LLM compression)."""
    input_ids = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    side = padding_side(mask)
    b = input_ids.shape[0]
    if mask is None:
        mask = torch.ones_like(input_ids)
    keep = keep & mask.bool()
    lengths = keep.sum(dim=1)
    width = int(lengths.max())
    out = dict(kwargs)

    def pack(t: torch.Tensor, fill: Any) -> torch.Tensor:
        new = torch.full((b, width), fill, dtype=t.dtype, device=t.device)
        for i in range(b):
            row = t[i][keep[i]]
            if side == "left":
                new[i, width - row.shape[0]:] = row
            else:
                new[i, : row.shape[0]] = row
        return new

    out["input_ids"] = pack(input_ids, pad_token_id)
    new_mask = pack(torch.ones_like(mask), 0)
    out["attention_mask"] = new_mask.to(mask.dtype)
    for key in seq_keys:
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.shape[:2] == input_ids.shape:
            out[key] = pack(t, -100 if key == "labels" else 0)
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() == 2:
        out["position_ids"] = (new_mask.long().cumsum(-1) - 1).clamp(min=0).to(pos.dtype)
    if "cache_position" in kwargs and kwargs["cache_position"] is not None:
        out["cache_position"] = torch.arange(width, device=input_ids.device)
    return out


def pad_id_for(config: Any, avoid: set[int]) -> int:
    for cfg in (config, getattr(config, "text_config", None)):
        pid = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if isinstance(pid, int) and pid >= 0 and pid not in avoid:
            return pid
    return next(i for i in range(len(avoid) + 1) if i not in avoid)


def item_starts(input_ids: torch.Tensor, token_id: int, sizes: list[int], owners: list[int]) -> list[int]:
    """The sequence position of each item's first placeholder (item ``j``: the next ``sizes[j]`` placeholders
    ``token_id`` of sample ``owners[j]``), to put the items of several modalities in sequence order."""
    where = [(input_ids[b] == token_id).nonzero().flatten() for b in range(input_ids.shape[0])]
    cursor = [0] * input_ids.shape[0]
    starts = []
    for n, b in zip(sizes, owners):
        starts.append(int(where[b][cursor[b]]))
        cursor[b] += n
    return starts


def multi_keep_mask(input_ids: torch.Tensor, counts: dict[int, list[list[tuple[int, int]]]]) -> torch.Tensor:
    """:func:`placeholder_keep_mask` for several placeholder tokens at once (``counts``: token id -> per-sample
    ``(n, k)`` of its items): text is kept, each item keeps its first ``k`` placeholders."""
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for token_id, per_sample in counts.items():
        keep &= placeholder_keep_mask(input_ids, token_id, per_sample)
    return keep


def check_grid(grid: Any, key: str, pixels: str, modality: str, merge: int, model: str, hint: str) -> torch.Tensor:
    """The validated ``[n, 3]`` (t, h, w) patch grids ``grid`` (``kwargs[key]``) that come with ``pixels`` for a
    Qwen vision tower: present, ``[n, 3]``, positive, heights and widths multiples of the ``merge`` size. ``model``
    and ``hint`` (how to build the inputs) name the model family in the error."""
    if grid is None:
        raise ValueError(f"{key} is required with {pixels} for {model}; build the inputs with the model's processor "
                         f"({hint})")
    grid = torch.as_tensor(grid)
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"{key} must have shape [num_{modality}s, 3], got {tuple(grid.shape)}")
    if bool(((grid[:, 1:] % merge) != 0).any()) or bool((grid <= 0).any()):
        raise ValueError(f"{key} must hold positive grids whose heights/widths are multiples of "
                         f"spatial_merge_size={merge}, got {grid.tolist()}")
    return grid


def placeholder_runs(input_ids: torch.Tensor, token_id: int) -> list[list[torch.Tensor]]:
    """Per sample, the maximal runs of consecutive ``token_id`` placeholders, as ascending position tensors in
    sequence order: one run per image on models that put marker tokens around each image's (or tile's) feature
    placeholders (Gemma 3's ``<start_of_image>``/``<end_of_image>``, SmolVLM's per-tile ``<row_i_col_j>``)."""
    runs: list[list[torch.Tensor]] = []
    for row in input_ids:
        pos = (row == token_id).nonzero().flatten()
        if pos.numel() == 0:
            runs.append([])
            continue
        breaks = (pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1
        runs.append(list(torch.tensor_split(pos, breaks.cpu())))
    return runs


def check_runs(runs: list[list[torch.Tensor]], sizes: list[int], what: str, hint: str) -> list[int]:
    """The sample of each of ``sizes`` items, checking that the prompt's placeholder runs (``placeholder_runs``, in
    sequence order) are exactly those items: as many runs as items, run ``j`` of ``sizes[j]`` tokens. ``what`` /
    ``hint`` name the unit (image, tile) and how to build the inputs, in the ValueError."""
    flat = [(b, int(r.numel())) for b, sample in enumerate(runs) for r in sample]
    if [n for _, n in flat] != list(sizes):
        raise ValueError(f"the {what}s do not match the prompt: {len(sizes)} {what}(s) of {sorted(set(sizes))} "
                         f"tokens, but input_ids hold {len(flat)} placeholder runs of lengths "
                         f"{[n for _, n in flat][:8]}{'...' if len(flat) > 8 else ''}; {hint}")
    return [b for b, _ in flat]
