"""Stage "llm" (tokenzip.llm): pruning inside the decoder, checked against oracles written here from scratch.

The oracle runs the decoder layers by hand: layers < K on the full sequence, then layers >= K on the kept hidden
states only (original positions, plain causal mask), with the scores taken from the EAGER attention weights of
layer K - 1. The method runs the stock SDPA model through hooks; both must agree.
"""

import inspect

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import adapter_for
from tokenzip.compat import cache_from, cache_kwarg, output_cache
from tokenzip.llm.base import geometric_counts
from tokenzip.llm.scores import attention_rows
from tokenzip.llm.slots import as_allowed
from tokenzip.methods.fastv import FastV
from tokenzip.methods.pyramiddrop import PyramidDrop
from tokenzip.methods.sparsevlm import SparseVLM
from tokenzip.methods.vtw import VTW
from tokenzip.methods.zipvl import ZipVL
from tokenzip.testing import CASES, IMAGE_TOKEN, default_samples

from conftest import built, method_case_pairs
from hybrid_oracle import greedy, prompt_call, run_layers

CASE = "llava"


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, position_ids=_positions(inputs["attention_mask"])).logits


def _prompt_embeds(model, inputs):
    """The LLM's input embeddings (image features merged in) from a stock forward."""
    seen = {}
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True)
    try:
        _logits(model, inputs)
    finally:
        h.remove()
    return seen["e"]


def _oracle(model, embeds, items, plan, fixed=None, score="last"):
    """Greedy-free reference forward of ONE unpadded sequence ``embeds`` ``[1, L, D]``.

    ``items``: position lists of the visual items; ``plan``: {layer: [count per item, None = keep all]}. At a stage
    layer each item keeps its ``count`` remaining positions with the highest eager attention in the layer before
    (mean over heads; ties to the earlier position) from the last token (``score="last"``) or averaged over the
    text tokens after the item (``score="text"``), unless ``fixed`` {layer: kept positions} is given, in which case
    that set is kept (positions beyond the prompt, i.e. generated tokens, are always kept).
    Returns (logits at the final kept positions, kept positions, {layer: kept position set}).
    """
    lm = model.model.language_model
    keep = list(range(embeds.shape[1]))
    h = embeds
    remaining = [list(p) for p in items]
    chosen = {}
    weights = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, out, i=i: weights.__setitem__(i, out[1]))
             for i, layer in enumerate(lm.layers)]
    try:
        with torch.no_grad():
            for i, layer in enumerate(lm.layers):
                if i in plan:
                    att = weights[i - 1][0].mean(0)  # [W, W] over current slots, mean over heads
                    visual = {p for r in remaining for p in r}
                    drop = set()
                    for j, count in enumerate(plan[i]):
                        cur = remaining[j]
                        rows = [s for s, p in enumerate(keep) if p not in visual and cur and p > max(cur)]
                        row = att[rows].mean(0) if score == "text" and rows else att[-1]
                        last_row = row
                        if count is None:
                            continue
                        if fixed is not None:
                            kept = [p for p in cur if p in fixed[i]]
                        else:
                            val = torch.stack([last_row[keep.index(p)] for p in cur]) if cur else torch.zeros(0)
                            order = torch.sort(val, descending=True, stable=True).indices[:count].tolist()
                            kept = sorted(cur[o] for o in order)
                        drop |= set(cur) - set(kept)
                        remaining[j] = kept
                    slots = [s for s, p in enumerate(keep) if p not in drop]
                    h = h[:, slots]
                    keep = [keep[s] for s in slots]
                    chosen[i] = set(keep)
                pos = torch.tensor([keep])
                w = len(keep)
                mask = torch.full((1, 1, w, w), torch.finfo(h.dtype).min).triu(1)
                h = layer(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
            logits = model.lm_head(lm.norm(h))
    finally:
        for hk in hooks:
            hk.remove()
    return logits, keep, chosen


def _single(model, sample):
    return CASES[CASE].make_inputs(model, [sample])


def _items(inputs):
    ids = inputs["input_ids"][0]
    pos = (ids == IMAGE_TOKEN).nonzero().flatten().tolist()
    n = len(pos) // inputs["pixel_values"].shape[0]
    return [pos[j * n:(j + 1) * n] for j in range(len(pos) // n)]


METHODS = [
    pytest.param(lambda: FastV(retain=0.3, layer=1), id="fastv-K1"),
    pytest.param(lambda: FastV(retain=0.3, layer=1, score="text"), id="fastv-text"),
    pytest.param(lambda: ZipVL(retain=0.25, layers=(1, 2), tau=0.6), id="zipvl"),
    pytest.param(lambda: FastV(tokens=5, layer=2), id="fastv-K2"),
    pytest.param(lambda: PyramidDrop(retain=0.25), id="pyramiddrop"),
    pytest.param(lambda: VTW(layer=1), id="vtw"),
]


def _plan(c, n_items, n, num_layers):
    plan = {}
    for layer, count in c.schedule(n, num_layers):
        plan[layer] = [count] * n_items
    return plan


def _plan_from_stats(stats):
    """{layer: [count per item]} from what the method recorded (adaptive methods choose their counts)."""
    items = stats["image"].items
    layers = sorted({layer for it in items for layer, _ in it.stages})
    return {layer: [dict(it.stages).get(layer) for it in items] for layer in layers}


@pytest.mark.parametrize("make", METHODS)
@pytest.mark.parametrize("sample", [0, 1])
def test_logits_equal_layerwise_oracle(make, sample):
    sdpa, eager = built(CASE), built(CASE, "eager")
    inputs = _single(sdpa, default_samples()[sample])
    items = _items(inputs)
    c = make()
    with c(sdpa):
        out = _logits(sdpa, inputs)
    plan = _plan_from_stats(c.last_stats[0])
    ref, keep, _ = _oracle(eager, _prompt_embeds(eager, inputs), items, plan, score=_score(c))
    torch.testing.assert_close(out[0, keep], ref[0], atol=2e-5, rtol=1e-4)
    kept = sorted(p for j, it in enumerate(c.last_stats[0]["image"].items)
                  for p in torch.tensor(items[j])[it.index].tolist())
    assert kept == sorted(set(keep) & {p for it in items for p in it})
    if not isinstance(c, ZipVL):
        for it in c.last_stats[0]["image"].items:
            assert it.stages == [(layer, cnt) for layer, cnt in c.schedule(it.tokens_in, 3)]


def _score(c):
    return "text" if isinstance(c, ZipVL) or getattr(c, "score", "last") == "text" else "last"


@pytest.mark.parametrize("case", [name for name, c in CASES.items() if "llm" in c.stages])
def test_scores_equal_eager_attention_weights(case):
    """attention_rows (recomputed from the layer's q/k projections, RoPE / M-RoPE, GQA, under SDPA) == the eager
    attention weights of that layer, at every real row of a left-padded batch."""
    sdpa, eager = built(case), built(case, "eager")
    inputs = CASES[case].make_inputs(sdpa, default_samples())
    # layer 1, or on a hybrid LLM the first full-attention layer after layer 0 (eager records attention weights of
    # the full-attention layers only)
    full = [i for i, kind in enumerate(adapter_for(sdpa).llm_layer_kinds()) if kind == "full_attention"]
    k = next((i for i in full if i >= 1), full[0])
    cap = {}
    attn = adapter_for(sdpa).parts().decoder_layers[k].self_attn
    h = attn.register_forward_pre_hook(lambda m, a, kw: cap.update(x=kw["hidden_states"], pe=kw["position_embeddings"],
                                                                   mask=kw["attention_mask"]), with_kwargs=True)
    try:
        _case_forward(case, sdpa, inputs)
    finally:
        h.remove()
    hook = CASES[case].position_ids
    pos = hook(eager, inputs) if hook is not None else _positions(inputs["attention_mask"])
    with torch.no_grad():
        weights = eager(**inputs, position_ids=pos, output_attentions=True).attentions
        ref = weights[full.index(k)] if len(weights) == len(full) else weights[k]
    mask = inputs["attention_mask"].bool()
    b, length = mask.shape
    rows = torch.arange(length).expand(b, -1).clone().masked_fill(~mask, -1)  # every real row; padding rows unused
    with torch.no_grad():
        # under the layer's own mask (Gemma 3: bidirectional image blocks, a sliding window), as the runner scores
        got = attention_rows(attn, cap["x"], cap["pe"], mask, rows, as_allowed(cap["mask"]))
    for i in range(b):
        real = mask[i]
        torch.testing.assert_close(got[i][:, real], ref[i][:, real].float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("make", METHODS)
def test_cached_generation_equals_fixed_set_oracle(make):
    """Greedy decoding with the shortened KV cache == recomputing each step WITHOUT cache over [kept prompt +
    generated tokens], the kept set fixed at prefill. (Plain uncached generate() re-selects every step, since the
    last token changes; it is not the reference for query-dependent LLM-stage methods.)"""
    sdpa, eager = built(CASE), built(CASE, "eager")
    inputs = _single(sdpa, default_samples()[0])
    items = _items(inputs)
    c = make()
    steps = 5
    with c(sdpa):
        out = sdpa.generate(**inputs, max_new_tokens=steps, do_sample=False, use_cache=True)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    plan = _plan_from_stats(c.last_stats[0])
    embeds = _prompt_embeds(eager, inputs)
    logits, _, fixed = _oracle(eager, embeds, items, plan, score=_score(c))
    ref = [int(logits[0, -1].argmax())]
    emb = eager.model.get_input_embeddings()
    for _ in range(steps - 1):
        seq = torch.cat([embeds, emb(torch.tensor([ref]))], dim=1)
        logits, _, _ = _oracle(eager, seq, items, plan, fixed=fixed)
        ref.append(int(logits[0, -1].argmax()))
    assert new == ref


def test_multi_turn_continues_the_shortened_cache():
    """A second generate() on the returned cache (new user turn) == the fixed-set oracle over the whole dialogue."""
    sdpa, eager = built(CASE), built(CASE, "eager")
    inputs = _single(sdpa, default_samples()[0])
    items = _items(inputs)
    c = FastV(retain=0.3, layer=1)
    turn2 = torch.tensor([[30, 31, 32]])
    with c(sdpa):
        first = sdpa.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([first.sequences, turn2], dim=1)
        second = sdpa.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                               **{cache_kwarg(sdpa): output_cache(first)})
    plan = _plan(c, len(items), len(items[0]), len(sdpa.model.language_model.layers))
    embeds = _prompt_embeds(eager, inputs)
    _, _, fixed = _oracle(eager, embeds, items, plan)
    emb = eager.model.get_input_embeddings()
    seq_ids = ids[0, inputs["input_ids"].shape[1]:].tolist()
    got = second[0, ids.shape[1]:].tolist()
    ref = []
    for _ in range(3):
        seq = torch.cat([embeds, emb(torch.tensor([seq_ids + ref]))], dim=1)
        logits, _, _ = _oracle(eager, seq, items, plan, fixed=fixed)
        ref.append(int(logits[0, -1].argmax()))
    assert got == ref


@pytest.mark.parametrize("make", METHODS)
def test_padded_batch_generation_equals_singles(make):
    model = built(CASE)
    samples = default_samples()
    batch = CASES[CASE].make_inputs(model, samples)
    c = make()
    with c(model):
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        singles = [model.generate(**_single(model, s), max_new_tokens=4, do_sample=False) for s in samples]
    width = batch["input_ids"].shape[1]
    for i, one in enumerate(singles):
        assert out[i, width:].tolist() == one[0, one.shape[1] - 4:].tolist()


def test_retain_one_and_restore():
    model = built(CASE)
    inputs = CASES[CASE].make_inputs(model, default_samples())
    ref = _logits(model, inputs)
    before = {(n, id(h)) for n, m in model.named_modules() for h in (*m._forward_pre_hooks.values(),
                                                                       *m._forward_hooks.values())}
    for c in (FastV(retain=1.0), PyramidDrop(retain=1.0), VTW(retain=1.0), SparseVLM(retain=1.0), ZipVL(retain=1.0)):
        with c(model):
            assert torch.equal(_logits(model, inputs), ref)
    with pytest.raises(RuntimeError), FastV(retain=0.2)(model):
        _logits(model, inputs)
        raise RuntimeError("boom")
    assert torch.equal(_logits(model, inputs), ref)
    after = {(n, id(h)) for n, m in model.named_modules() for h in (*m._forward_pre_hooks.values(),
                                                                      *m._forward_hooks.values())}
    assert after <= before and "forward" not in model.__dict__


def test_vtw_budget_is_layers_and_bad_input():
    assert VTW(retain=0.5).schedule(16, 32) == [(16, 0)]
    assert VTW(tokens=3).schedule(16, 32) == [(3, 0)]
    assert VTW(retain=1.0).schedule(16, 32) == []
    assert geometric_counts(64, 8, 3) == [32, 16, 8]
    with pytest.raises(ValueError, match="layer"):
        FastV(retain=0.5, layer=7).schedule(16, 3)
    with pytest.raises(ValueError, match="score"):
        FastV(retain=0.5, score="mean")
    model = built(CASE, "eager")
    with pytest.raises(ValueError, match="beam"), FastV(retain=0.5)(model):
        model.generate(**_single(model, default_samples()[0]), num_beams=2, max_new_tokens=2)


def test_sparsevlm_recycled_tokens_equal_merge_oracle():
    """Recycled (merged) tokens: the oracle averages each group's hidden states at the pruning layer, places the
    result at the group's first position, and runs the remaining layers on [text + kept + recycled]."""
    sdpa, eager = built(CASE), built(CASE, "eager")
    inputs = _single(sdpa, default_samples()[0])
    items = _items(inputs)
    c = SparseVLM(retain=0.5, recycle=0.25)
    with c(sdpa):
        out = _logits(sdpa, inputs)
    (layer, count), = c.schedule(len(items[0]), 3)
    it = c.last_stats[0]["image"].items[0]
    members = [[] for _ in range(it.tokens_out)]
    for j, slot in enumerate(it.source.tolist()):
        if slot >= 0:
            members[slot].append(items[0][j])
    assert it.tokens_out == count and any(len(m) > 1 for m in members)  # something was recycled
    lm = eager.model.language_model
    cap = {}
    h = lm.layers[layer].register_forward_pre_hook(lambda m, a, kw: cap.update(h=a[0] if a else kw["hidden_states"]),
                                                   with_kwargs=True)
    try:
        _logits(eager, inputs)
    finally:
        h.remove()
    hid = cap["h"][0]
    visual = set(items[0])
    rep = {m[0]: hid[m].mean(0) for m in members}
    keep = sorted([p for p in range(hid.shape[0]) if p not in visual] + list(rep))
    x = torch.stack([rep.get(p, hid[p]) for p in keep])[None]
    pos = torch.tensor([keep])
    w = len(keep)
    mask = torch.full((1, 1, w, w), torch.finfo(x.dtype).min).triu(1)
    with torch.no_grad():
        for lay in lm.layers[layer:]:
            x = lay(x, attention_mask=mask, position_embeddings=lm.rotary_emb(x, pos), position_ids=pos)
        ref = eager.lm_head(lm.norm(x))
    torch.testing.assert_close(out[0, keep], ref[0], atol=2e-5, rtol=1e-4)
    assert it.index.tolist() == sorted(items[0].index(m[0]) for m in members)


def test_compose_pre_llm_then_llm():
    model = built(CASE)
    inputs = CASES[CASE].make_inputs(model, default_samples())
    pre, llm = tz.get("avgpool", retain=0.5), tz.get("fastv", retain=0.5, layer=1)
    c = tz.compose(pre, llm)
    assert c.retain == 0.25 and c.effective(16, 3) == 4
    with c(model):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        logits = _logits(model, inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    for stats in c.last_stats:
        for it in stats["image"].items:
            assert (it.tokens_in, it.tokens_out) == (16, 4)
            assert set(it.source[it.source >= 0].tolist()) == {0, 1, 2, 3}  # 8 pooled groups, fastv keeps 4
            assert it.index.tolist() == sorted(it.index.tolist()) and len(it.index) == 4
    # the pre-LLM part shortened the prompt: logits cover the shortened sequence (the LLM stage keeps that length)
    assert logits.shape[1] < inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="pre-LLM"):
        tz.compose(llm, pre)


# ---- a model-agnostic oracle: the stock model with the dropped tokens masked out as keys ---------------------------
# Removing a token from layers >= K is the same, for every other token, as hiding it as a key in those layers (its
# own row is then irrelevant). So the stock model with such masks, full-length KV cache and the model's own
# positions (M-RoPE included) is a reference for every adapter: logits at kept positions and greedy decoding.

class _MaskOracle:
    """The stock model with the compressed run's selection imposed at prefill: at each stage layer the merged
    groups' first positions get the mean of their members' hidden states (``ops.merge``'s plain mean), and from that
    layer on every dropped (or merged-away) position is hidden as a key. Decoding steps keep the masks."""

    def __init__(self, model, lm, plan, prompt_len):
        self.plan, self.prompt_len, self.mask2d = plan, prompt_len, None
        layers = adapter_for(model).parts().decoder_layers
        self.handles = [lm.register_forward_pre_hook(self._lm, with_kwargs=True)]
        self.handles += [lay.register_forward_pre_hook(self._layer(i), with_kwargs=True)
                         for i, lay in enumerate(layers)]
        self.dtype = next(model.parameters()).dtype
        self.impl = lm.config._attn_implementation
        self.first = min(plan)

    def _lm(self, m, args, kwargs):
        e = kwargs["inputs_embeds"]
        past = cache_from(kwargs)
        p = past.get_seq_length() if past is not None else 0
        mask = kwargs.get("attention_mask")
        # a model that prepares its decoder's masks (Gemma 3: a dict per layer type) has its padding in them
        plain = mask is None or isinstance(mask, dict)
        self.mask2d = torch.ones(e.shape[0], p + e.shape[1], dtype=torch.bool) if plain else mask.bool()
        self.q = e.shape[1]

    def _dropped_before(self, i):
        drop = torch.zeros_like(self.mask2d)
        for layer, entries in self.plan.items():
            if layer <= i:
                for b, _, dropped in entries:
                    drop[b, dropped] = True
        return drop

    def _layer(self, i):
        def hook(m, args, kwargs):
            if i < self.first:
                return None
            kwargs = dict(kwargs)
            if i in self.plan and self.q == self.prompt_len:  # prefill: merged groups become their mean
                h = (args[0] if args else kwargs["hidden_states"]).clone()
                for b, groups, _ in self.plan[i]:
                    for g in groups:
                        h[b, g[0]] = h[b, g].mean(0)
                if args:
                    args = (h,) + tuple(args[1:])
                else:
                    kwargs["hidden_states"] = h
            drop = self._dropped_before(i)
            own = kwargs.get("attention_mask")
            if isinstance(own, torch.Tensor) and own.dim() == 4:
                # the layer's own mask (bidirectional blocks, a sliding window: its cache holds the last `kv` keys),
                # with the dropped positions hidden as keys
                stock = own if own.dtype == torch.bool else own == 0
                kv = stock.shape[-1]
                qpos = kv - self.q + torch.arange(self.q)
                allowed = stock[:, 0] & ~drop[:, None, -kv:]
            else:
                kv = self.mask2d.shape[1]
                qpos = kv - self.q + torch.arange(self.q)
                causal = torch.arange(kv)[None, None] <= qpos[None, :, None]
                allowed = self.mask2d[:, None, :] & ~drop[:, None, :] & causal
            allowed |= (torch.arange(kv)[None, None] == qpos[None, :, None])
            mask = allowed[:, None]
            if self.impl == "eager":
                mask = torch.zeros(mask.shape, dtype=self.dtype).masked_fill(~mask, torch.finfo(self.dtype).min)
            kwargs["attention_mask"] = mask
            return args, kwargs
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _case_forward(case, model, inputs):
    hook = CASES[case].position_ids
    pos = hook(model, inputs) if hook is not None else _positions(inputs["attention_mask"])
    with torch.no_grad():
        return model(**inputs, position_ids=pos).logits


def stage_plan(c, inputs, media_token_ids):
    """``{layer: [(sample, groups, dropped)]}`` from ``c.last_stats``: per stage of each item, the groups of original
    sequence positions that form its output tokens (first member = where the token sits) and the positions it
    removes (dropped, or merged into an earlier member)."""
    ids = inputs["input_ids"]
    plan = {}
    for b, stats in enumerate(c.last_stats):
        cursor = dict.fromkeys(stats, 0)
        for modality, ms in stats.items():
            where = (ids[b] == media_token_ids[modality]).nonzero().flatten().tolist()
            for it in ms.items:
                alive = where[cursor[modality]: cursor[modality] + it.tokens_in]
                cursor[modality] += it.tokens_in
                for (layer, k), src in zip(it.stages, it.stage_sources):
                    groups = [[] for _ in range(k)]
                    for pos, slot in zip(alive, src.tolist()):
                        if slot >= 0:
                            groups[slot].append(pos)
                    reps = [g[0] for g in groups]
                    plan.setdefault(layer, []).append((b, groups, sorted(set(alive) - set(reps))))
                    alive = reps
    return plan


def _stock_generate_inputs(model, inputs):
    """``inputs`` without a ``mm_token_type_ids`` the model's forward() does not name: the stock forward ignores it
    and the stock generate() refuses it (InternVL, where it marks video frames for tokenzip's adapter only)."""
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        return inputs
    return {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}


def assert_equals_mask_oracle(model, c, inputs, out, gen, forward):
    """``out`` (logits at kept real positions) and ``gen`` (4 greedy tokens) of the compressed run equal the stock
    model's with the run's own selection imposed by :class:`_MaskOracle` (``forward()`` gives its logits)."""
    parts = adapter_for(model).parts()
    plan = stage_plan(c, inputs, parts.media_token_ids)
    removed = sum(len(d) for entries in plan.values() for _, _, d in entries)
    assert removed == sum(it.tokens_in - it.tokens_out for s in c.last_stats for ms in s.values() for it in ms.items)
    assert removed > 0, "the method removed nothing: the oracle would compare the model with itself"
    oracle = _MaskOracle(model, parts.language_model, plan, inputs["input_ids"].shape[1])
    try:
        ref = forward()
        ref_gen = model.generate(**_stock_generate_inputs(model, inputs), max_new_tokens=4, do_sample=False)
    finally:
        oracle.remove()
    keep = inputs["attention_mask"].bool() & ~oracle._dropped_before(len(parts.decoder_layers))[:, : ref.shape[1]]
    torch.testing.assert_close(out[keep], ref[keep], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, ref_gen)


# decode-time KV pruning (dycoke_kv) selects nothing at prefill: tests/test_llm_video.py holds its decoding oracle;
# a multi-stage method shortens the prompt before the LLM, so the oracle (built on the caller's prompt) takes its LLM
# part alone (tests/test_methods_2026c.py)
LLM_PAIRS = [p for p in method_case_pairs() if p.values[0].info.stage == "llm"
             and p.values[0](retain=1.0).decode_layer(2) is None and not hasattr(p.values[0](retain=1.0), "parts")]


@pytest.mark.parametrize("method,case", LLM_PAIRS)
def test_equals_the_masking_oracle_logits_and_generation(method, case):
    """Every registered LLM-stage method on every adapter with an LLM stage (a left-padded batch of 3): logits at
    kept positions and greedy generation == the stock model with the selection imposed by masks."""
    model = built(case)
    inputs = CASES[case].make_inputs(model, default_samples())
    c = method(retain=0.3)
    with c(model):
        out = _case_forward(case, model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    kinds = adapter_for(model).llm_layer_kinds()
    if "linear_attention" in kinds:  # masks cannot hide tokens from a recurrence: the removal oracle
        assert_equals_removal_oracle(model, c, case, inputs, out, gen, kinds)
    else:
        assert_equals_mask_oracle(model, c, inputs, out, gen, lambda: _case_forward(case, model, inputs))


def assert_equals_removal_oracle(model, c, case, inputs, out, gen, kinds, samples=None):
    """A hybrid LLM (tests/hybrid_oracle.py): for each sample of the left-padded batch, the logits at its kept
    positions and its greedy tokens equal the stock layers run by hand on that sample alone with the run's own
    selection REMOVED from the layers after each stage (linear-attention layers included)."""
    samples = samples or default_samples()
    plan = stage_plan(c, inputs, adapter_for(model).parts().media_token_ids)
    assert sum(len(d) for entries in plan.values() for _, _, d in entries) > 0, "the method removed nothing"
    mask = inputs["attention_mask"]
    width = mask.shape[1]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for b, sample in enumerate(samples):
        pad = width - int(mask[b].sum())
        one = CASES[case].make_inputs(model, [sample])
        embeds, positions = prompt_call(model, one, CASES[case].position_ids(model, one))
        mine = {layer: [([[p - pad for p in g] for g in groups], [p - pad for p in dropped])
                        for row, groups, dropped in entries if row == b] for layer, entries in plan.items()}
        mine = {layer: entries for layer, entries in mine.items() if entries}
        logits, keep = run_layers(model, kinds, embeds, positions, mine)
        torch.testing.assert_close(out[b, [pad + p for p in keep]], logits[0], atol=2e-5, rtol=1e-4)
        tokens = gen[b, width:].tolist()
        stop = next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))
        assert tokens[:stop] == greedy(model, kinds, embeds, positions, mine, len(tokens))[0][:stop]


def test_eager_and_sdpa_generate_the_same_with_shortened_cache():
    """The per-layer masks come in each implementation's format (bool for SDPA, additive for eager)."""
    outs = []
    for attn in ("sdpa", "eager"):
        model = built(CASE, attn)
        batch = CASES[CASE].make_inputs(model, default_samples())
        with PyramidDrop(retain=0.25)(model):
            outs.append(model.generate(**batch, max_new_tokens=5, do_sample=False))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("case", ["llava_onevision", "llava_onevision_video"])
@pytest.mark.parametrize("make", [lambda: FastV(retain=0.3), lambda: PyramidDrop(retain=0.25)], ids=["fastv", "pdrop"])
def test_ragged_batch_is_repacked_to_the_longest_kept_row(case, make):
    """After a stage the batch is re-packed: every later decoder layer processes exactly as many positions as the
    row with the most kept (real) tokens, not that plus the batch's original left padding; layers before the first
    stage run on the caller's padded width. The batch's greedy generation still equals each sample's."""
    model = built(case)
    batch = CASES[case].make_inputs(model, default_samples())
    mask = batch["attention_mask"]
    assert len(set(mask.sum(1).tolist())) == 3, "the batch must be ragged for this test to mean anything"
    c = make()
    layers = adapter_for(model).parts().decoder_layers
    width = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: width.__setitem__(i, kw["hidden_states"].shape[1]), with_kwargs=True)
        for i, layer in enumerate(layers)]
    try:
        with c(model):
            _case_forward(case, model, batch)
    finally:
        for h in hooks:
            h.remove()
    items = [[it for ms in s.values() for it in ms.items] for s in c.last_stats]
    for i in range(len(layers)):
        kept = [int(mask[b].sum()) - sum(it.tokens_in - min([k for layer, k in it.stages if layer <= i],
                                                            default=it.tokens_in) for it in items[b])
                for b in range(mask.shape[0])]
        shortened = any(layer <= i for its in items for it in its for layer, _ in it.stages)
        assert width[i] == (max(kept) if shortened else mask.shape[1]), f"layer {i}: {width[i]} vs kept {kept}"
    assert width[len(layers) - 1] < mask.shape[1] - int((mask == 0).sum(1).min())  # padding really went away
    with c(model):
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        singles = [model.generate(**CASES[case].make_inputs(model, [s]), max_new_tokens=4, do_sample=False)
                   for s in default_samples()]
    for i, one in enumerate(singles):
        assert out[i, mask.shape[1]:].tolist() == one[0, one.shape[1] - 4:].tolist()
