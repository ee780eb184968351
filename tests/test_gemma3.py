"""Gemma 3: the bidirectional image blocks after shortening (before and inside the LLM, full and sliding-window
layers), markers kept, and what the adapter refuses. The generic invariants run on the ``gemma3`` case by
registration (tests/test_invariants.py, tests/test_llm_stage.py)."""

import pytest
import torch

from tokenzip.adapters import adapter_for
from tokenzip.methods.fastv import FastV
from tokenzip.methods.pyramiddrop import PyramidDrop
from tokenzip.methods.visionzip import VisionZip
from tokenzip.testing import (
    GEMMA3_BOI,
    GEMMA3_EOI,
    GEMMA3_LAYER_TYPES,
    GEMMA3_WINDOW,
    IMAGE_TOKEN,
    default_samples,
    gemma3_inputs,
)

from conftest import built

CASE = "gemma3"


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _expected(pos, valid, block, window):
    """``[W, W]`` may-attend over slots holding original positions ``pos`` (``valid``: real), ``block`` the image
    block id of each slot (-1: text): causal in position order OR the same image block, AND (sliding layers) a key
    at most ``window - 1`` positions before the query — written here from the Gemma 3 paper's description."""
    q, k = pos[:, None], pos[None, :]
    same = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    allowed = valid[None, :] & valid[:, None] & ((k <= q) | same)
    if window is not None:
        allowed &= (q - k) < window
    return allowed


def _blocks(ids):
    """Image block id of each position of ``ids`` ``[L]`` (consecutive soft tokens form one block)."""
    image = ids == IMAGE_TOKEN
    start = image & ~torch.cat([torch.zeros(1, dtype=torch.bool), image[:-1]])
    return torch.where(image, start.long().cumsum(0) - 1, torch.full_like(ids, -1))


def _as_bool(mask):
    return mask if mask.dtype == torch.bool else mask == 0


def _capture_layer_masks(model):
    seen = {}
    layers = adapter_for(model).parts().decoder_layers

    def note(i):
        def hook(module, args, kwargs):
            seen.setdefault(i, kwargs["attention_mask"])  # the first (prefill) call
        return hook

    hooks = [layer.self_attn.register_forward_pre_hook(note(i), with_kwargs=True) for i, layer in enumerate(layers)]
    return seen, hooks


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pre_llm_block_mask_after_shortening(attn):
    """A pre-LLM method shortens each image's soft-token run: the markers stay, token_type_ids shrink with the
    prompt, and every layer's mask (full and sliding) is the block overlay over exactly the kept tokens."""
    model = built(CASE, attn)
    inputs = gemma3_inputs(model, default_samples())
    seen_ids = {}
    core_hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: seen_ids.update(ids=kw["input_ids"], mask=kw["attention_mask"], types=kw["token_type_ids"]),
        with_kwargs=True)
    seen, hooks = _capture_layer_masks(model)
    k = 5
    try:
        with VisionZip(tokens=k)(model):
            with torch.no_grad():
                model(**inputs, position_ids=_positions(inputs["attention_mask"]))
    finally:
        core_hook.remove()
        for h in hooks:
            h.remove()
    ids, mask, types = seen_ids["ids"], seen_ids["mask"].bool(), seen_ids["types"]
    assert torch.equal(types, (ids == IMAGE_TOKEN).long() * mask.long())
    for b, s in enumerate(default_samples()):
        row = ids[b][mask[b]].tolist()
        # markers stay: each image is <start_of_image> + k soft tokens + <end_of_image>
        assert row == s.before + [GEMMA3_BOI, *([IMAGE_TOKEN] * k), GEMMA3_EOI] * s.n_items + s.after
    width = ids.shape[1]
    pos = torch.arange(width)
    for i, kind in enumerate(GEMMA3_LAYER_TYPES):
        window = GEMMA3_WINDOW if kind == "sliding_attention" else None
        got = _as_bool(seen[i])
        assert got.shape[-2:] == (width, width)
        for b in range(ids.shape[0]):
            real = mask[b]
            exp = _expected(pos, real, _blocks(ids[b]), window)
            assert torch.equal(got[b, 0][real][:, real], exp[real][:, real]), f"layer {i} ({kind}), sample {b}"
            blocks = _blocks(ids[b])
            if window is None:  # the overlay is there: a block's first token sees its last one
                first = (blocks == 0).nonzero().flatten()
                assert bool(got[b, 0, first[0], first[-1]])


@pytest.mark.parametrize("make", [lambda: FastV(retain=0.3, layer=1), lambda: PyramidDrop(retain=0.3)],
                         ids=["fastv", "pyramiddrop"])
def test_llm_stage_block_mask_after_dropping(make):
    """Tokens dropped inside the LLM: every later layer's mask over the kept slots is causal in ORIGINAL positions,
    each image's kept tokens attend to each other in both directions, and a sliding layer reaches back ``window``
    original positions (not slots)."""
    model = built(CASE)
    inputs = gemma3_inputs(model, default_samples())
    c = make()
    seen, hooks = _capture_layer_masks(model)
    try:
        with c(model):
            with torch.no_grad():
                model(**inputs, position_ids=_positions(inputs["attention_mask"]))
    finally:
        for h in hooks:
            h.remove()
    ids = inputs["input_ids"]
    checked = 0
    for i, kind in enumerate(GEMMA3_LAYER_TYPES):
        window = GEMMA3_WINDOW if kind == "sliding_attention" else None
        for b, stats in enumerate(c.last_stats):
            items = [it for ms in stats.values() for it in ms.items]
            if not any(at <= i for it in items for at, _ in it.stages):
                continue  # this layer runs on the full sequence: the model's own mask
            kept = _kept(ids[b], items, i) & inputs["attention_mask"][b].bool()
            pos = kept.nonzero().flatten()
            got = _as_bool(seen[i])[b, 0]
            w = got.shape[-1]
            slots = torch.arange(w - pos.numel(), w)  # kept tokens sit right-aligned, fillers on the left
            exp = _expected(pos, torch.ones_like(pos, dtype=torch.bool), _blocks(ids[b])[pos], window)
            assert torch.equal(got[slots][:, slots], exp), f"layer {i} ({kind}), sample {b}"
            checked += 1
    assert checked > 0


def _kept(ids, items, layer):
    """``[L]`` bool: the positions still holding a token at ``layer`` (text always; an item's tokens per its stages,
    a merged group at its first member)."""
    keep = ids != IMAGE_TOKEN
    where = (ids == IMAGE_TOKEN).nonzero().flatten().tolist()
    cursor = 0
    for it in items:
        alive = where[cursor: cursor + it.tokens_in]
        cursor += it.tokens_in
        for (at, k), src in zip(it.stages, it.stage_sources):
            if at > layer:
                break
            groups = [[] for _ in range(k)]
            for p, slot in zip(alive, src.tolist()):
                if slot >= 0:
                    groups[slot].append(p)
            alive = [g[0] for g in groups]
        keep[alive] = True
    return keep


def test_items_are_the_soft_token_runs():
    model = built(CASE)
    inputs = gemma3_inputs(model, default_samples())
    adapter = adapter_for(model)
    items = adapter.llm_items(inputs)
    assert [it.sample for it in items] == [0, 1, 1, 2]
    assert all(it.positions.numel() == model.config.mm_tokens_per_image for it in items)
    assert all(bool((inputs["input_ids"][it.sample, it.positions] == IMAGE_TOKEN).all()) for it in items)


def test_prompt_that_does_not_match_the_images_is_refused():
    model = built(CASE)
    inputs = gemma3_inputs(model, default_samples())
    inputs["pixel_values"] = inputs["pixel_values"][:3]  # four runs of soft tokens, three images
    method = VisionZip(retain=0.5)
    with pytest.raises(ValueError, match="placeholder runs"):
        with method(model):
            model(**inputs)


def test_pre_llm_then_llm_stage():
    """``tz.compose(pre-LLM, LLM-stage)``: the LLM stage finds the shortened soft-token runs and the shortened
    ``token_type_ids`` (each block's overlay over what the pre-LLM method kept), and generation runs."""
    import tokenzip as tz

    model = built(CASE)
    inputs = gemma3_inputs(model, default_samples())
    pipeline = tz.compose(VisionZip(tokens=8), FastV(tokens=3, layer=1))
    seen, hooks = _capture_layer_masks(model)
    try:
        with pipeline(model):
            with torch.no_grad():
                model(**inputs, position_ids=_positions(inputs["attention_mask"]))
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    # layer 1 runs on the shortened prompt: each image keeps 3 of its 8 tokens, still one bidirectional block
    got = _as_bool(seen[1])
    rows = got[:, 0, -1].sum(-1).tolist()  # the last (text) row's reach in a sliding layer: at most the window
    assert all(r <= GEMMA3_WINDOW for r in rows)
    full = _as_bool(seen[2])[:, 0]  # a full-attention layer: some query attends to a LATER key (the overlay)
    assert bool(torch.triu(full, diagonal=1).any())
