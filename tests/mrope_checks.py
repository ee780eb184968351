"""Checks shared by the tests of the adapters on tokenzip/adapters/mrope_vl.py (Qwen3.5, GLM-4.1V): kept tokens
reach the LLM with exactly the M-RoPE columns the model's own ``get_rope_index`` gives the FULL sequence, and
decoding continues at the uncompressed model's next position."""

import torch

from tokenzip.adapters import adapter_for
from tokenzip.compat import cache_kwarg, output_cache
from tokenzip.testing import CASES, default_samples


class LMCapture:
    """Every call of the language model: its position ids and attention mask."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("position_ids", "attention_mask")})

    def remove(self):
        self.handle.remove()


def assert_kept_positions(case, method):
    """``method`` on the case's left-padded batch: every kept media token and every text token reaches the LLM with
    the column the full sequence's ``get_rope_index`` gives it; ``rope_deltas`` and generate()'s first decoding
    step continue at ``max + 1``; a manual decoding step without position ids too."""
    model = CASES[case].build("sdpa")
    inputs = CASES[case].make_inputs(model, default_samples())
    full = CASES[case].position_ids(model, inputs)
    tokens = adapter_for(model).parts().media_token_ids
    cap = LMCapture(model)
    try:
        with method(model), torch.no_grad():
            model(**inputs)
            deltas = model.model.rope_deltas.clone()
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        cap.remove()
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    prefill, decode = cap.calls[0], cap.calls[2]  # forward, then generate's prefill and its first step
    ids = inputs["input_ids"]
    removed = 0
    for b, stats_b in enumerate(method.last_stats):
        keep = inputs["attention_mask"][b].bool().clone()
        for token in set(tokens.values()):
            keep &= ids[b] != token
        for modality, ms in stats_b.items():
            where = (ids[b] == tokens[modality]).nonzero().flatten()
            start = 0
            for it in ms.items:
                keep[where[start: start + it.tokens_in][it.index]] = True
                start += it.tokens_in
                removed += it.tokens_in - it.tokens_out
        lm_mask = prefill["attention_mask"][b].bool()
        assert torch.equal(prefill["position_ids"][1:, b][:, lm_mask], full[1:, b][:, keep]), f"sample {b}"
        top = int(full[1:, b][:, inputs["attention_mask"][b].bool()].max())
        assert decode["position_ids"][1:, b, -1].tolist() == [top + 1] * 3
        assert int(deltas[b]) == top + 1 - int(lm_mask.sum())
    assert removed > 0
    one = CASES[case].make_inputs(model, default_samples()[:1])
    top = int(CASES[case].position_ids(model, one)[1:].max())
    cap = LMCapture(model)
    try:
        with method(model), torch.no_grad():
            out = model(**one, use_cache=True)
            model(input_ids=out.logits[:, -1:].argmax(-1), **{cache_kwarg(model): output_cache(out)})
    finally:
        cap.remove()
    assert cap.calls[-1]["position_ids"][-3:, 0, -1].tolist() == [top + 1] * 3


# ---- stage "encoder" (tokenzip/adapters/merge_unit_vit.py) ---------------------------------------------------------
def _flat_grid(model, kind, grid):
    """The grid the model's own ``get_{kind}_features`` hands its ViT (GLM's clips: one ``(1, h, w)`` grid per
    temporal grid)."""
    if kind == "video" and type(model).__name__.startswith("Glm"):
        hw = grid[:, 1:].repeat_interleave(grid[:, 0], dim=0)
        return torch.cat([torch.ones_like(hw[:, :1]), hw], dim=1)
    return grid


def stock_vit_on_kept_units(model, kind, inputs, kept, cut):
    """The oracle: the model's own ViT forward, whose sequence is cut to the ``kept`` merge units (per item, indices
    in the model's unit order) after block ``cut - 1`` by hooks (the later blocks get the kept patches' rotary
    embedding and one attention segment per temporal grid of the units left), then its own tail. Per item its
    tokens."""
    visual = model.model.visual
    px, key = ("pixel_values_videos", "video_grid_thw") if kind == "video" else ("pixel_values", "image_grid_thw")
    grid = inputs[key]
    unit = int(model.config.vision_config.spatial_merge_size) ** 2
    keep, per_segment, start = [], [], 0
    for (t, h, w), idx in zip(grid.tolist(), kept):
        per = h * w // unit
        keep.append(start + idx)
        per_segment += [int(((idx >= f * per) & (idx < (f + 1) * per)).sum()) * unit for f in range(t)]
        start += t * per
    patches = (torch.cat(keep)[:, None] * unit + torch.arange(unit)).flatten()
    lengths = torch.tensor([n for n in per_segment if n > 0])

    def shorten(module, args, out):
        return out[patches]

    def later(module, args, kw):
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(kw["cu_seqlens"])
        kw = {**kw, "cu_seqlens": cu, "position_embeddings": tuple(t[patches] for t in kw["position_embeddings"])}
        if kw.get("max_seqlen") is not None:
            m = lengths.max()
            kw["max_seqlen"] = m.to(kw["max_seqlen"]) if isinstance(kw["max_seqlen"], torch.Tensor) else int(m)
        return args, kw

    handles = [visual.blocks[cut - 1].register_forward_hook(shorten)]
    handles += [b.register_forward_pre_hook(later, with_kwargs=True) for b in visual.blocks[cut:]]
    try:
        with torch.no_grad():
            out = visual(inputs[px].type(visual.dtype), grid_thw=_flat_grid(model, kind, grid), return_dict=True)
    finally:
        for h in handles:
            h.remove()
    return out.pooler_output.split([int(idx.numel()) for idx in kept])


def assert_encoder_cut_equals_stock_blocks(model, case, kind, cut):
    """A cut after block ``cut - 1`` that keeps every other merge unit of each image / clip (the adapter's encode,
    then rebuild): the tokens the LLM gets equal :func:`stock_vit_on_kept_units`, and the prompt keeps exactly
    their placeholders (``model``: the case's class, with a ViT deeper than the cut)."""
    from tokenzip.output import CompressOutput

    inputs = CASES[case].make_inputs(model, default_samples())
    adapter = adapter_for(model)
    adapter.set_encoder_layer(cut)
    outs, kept = [], []
    try:
        items = adapter.encode(inputs, frozenset())
        for it in items:
            n = it.tokens.shape[0]
            assert it.tokens.shape == (n, 4 * model.config.vision_config.hidden_size)
            idx = torch.arange(0, n, 2)
            source = torch.full((n,), -1, dtype=torch.long)
            source[idx] = torch.arange(idx.numel())
            outs.append(CompressOutput(it.tokens[idx][None], source[None], idx[None]))
            kept.append(idx)
        new = adapter.rebuild(inputs, items, outs)
    finally:
        adapter.release()
    ours = new["mm_encoder_outputs"][kind].pooler_output
    theirs = stock_vit_on_kept_units(model, kind, inputs, kept, cut)
    assert len(ours) == len(theirs) == len(kept)
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    token = adapter.token_of[kind]
    assert int((new["input_ids"] == token).sum()) == sum(idx.numel() for idx in kept)


def assert_encoder_schedule_lossless_and_at_budget(model, case, name):
    """A schedule of cuts after blocks 1 and 2 of ``model`` (the case's class, 3 vision blocks): retain=1 gives
    the stock logits; retain=0.5 brings every item to its budget (stats) and the LLM exactly those tokens."""
    import tokenzip as tz

    inputs = CASES[case].make_inputs(model, default_samples())
    pos = CASES[case].position_ids(model, inputs)
    with torch.no_grad():
        ref = model(**inputs, position_ids=pos).logits
        with tz.InEncoder(tz.get(name, retain=1.0), layer=(1, 2))(model):
            same = model(**inputs, position_ids=pos).logits
    torch.testing.assert_close(same, ref, atol=1e-4, rtol=1e-4)
    c = tz.InEncoder(tz.get(name, retain=0.5), layer=(1, 2))
    cap = LMCapture(model)
    try:
        with c(model), torch.no_grad():
            model(**inputs, position_ids=pos)
    finally:
        cap.remove()
    items = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    assert items and all(it.tokens_out == c.budget.count(it.tokens_in) < it.tokens_in for it in items)
    mask = cap.calls[0]["attention_mask"]
    for b, stats in enumerate(c.last_stats):
        removed = sum(it.tokens_in - it.tokens_out for ms in stats.values() for it in ms.items)
        assert int(mask[b].sum()) == int(inputs["attention_mask"][b].sum()) - removed
