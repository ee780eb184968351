"""Property-based fuzzing with hypothesis (issue 21, item 4).

1. Every registered method's ``compress()`` over random layouts of the modalities it declares (image grids, several
   grids, CLS + grid, AnyRes base + crops with a newline column, video frames with or without a trailing newline,
   1-D audio), N, k, batch, dtype (fp32/bf16/fp16) and degenerate tokens (constant, duplicated, N = 1, k = 1,
   k = N), held to the contract: exactly k outputs; ``source``/``index`` consistent with them (index strictly
   ascending, each output's group non-empty and led by its index, merged sizes + dropped = N); deterministic;
   finite in, finite out; dtype kept; constant in, constant out; each batch row as it is alone (fp32).
2. Bad values get a clear ValueError/TypeError: NaN/inf tokens, integer tokens, wrong rank, a layout that does not
   tile N, k out of range or not an int, signals of the wrong dtype.
3. Frame selectors' ``select()`` on random clips.
4. The patch over random batch compositions on tiny models (1-4 samples, 0-3 images or clips each, random prompt
   lengths, left padding), checked against each sample alone, for a few (model, method) pairs.

Profiles: ``quick`` (default; derandomized, a few examples per test: part of ``make test``) and ``fuzz`` (random,
many examples: ``make fuzz``, or ``TOKENZIP_FUZZ=fuzz pytest tests/test_fuzz.py``).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tokenzip as tz
from tokenzip.base import FrameSelector
from tokenzip.layout import Layout, Segment
from tokenzip.testing import CASES, Sample

from conftest import built, synthetic_signals

settings.register_profile("quick", max_examples=6, derandomize=True, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("fuzz", max_examples=300, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck), print_blob=True)
PROFILE = settings.get_profile(os.environ.get("TOKENZIP_FUZZ", "quick"))
# the patch examples run whole models: a third as many
PATCH_PROFILE = settings(PROFILE, max_examples=max(3, PROFILE.max_examples // 3))

TENSOR_METHODS = [m for m in tz.METHODS if m.info.stage != "input"]
FRAME_SELECTORS = [m for m in tz.METHODS if issubclass(m, FrameSelector)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# methods whose outputs are not selections or weighted means of their group's tokens, by design: VisionZip's
# contextual token is its target PLUS the mean of the tokens that joined it (the authors' code; its docstring), so a
# constant input gives twice the vector there (found by this fuzzing, kept: documented)
NOT_CONVEX = {"visionzip"}


# ---- strategies ----------------------------------------------------------------------------------------------------
def _side(max_value=5):
    return st.integers(1, max_value)


@st.composite
def image_layouts(draw):
    kind = draw(st.sampled_from(["grid", "grids", "cls", "anyres"]))
    if kind == "grid":
        return Layout([Segment("image", 1, draw(_side(7)), draw(_side(7)))])
    if kind == "grids":
        return Layout([Segment("image", 1, draw(_side()), draw(_side())) for _ in range(draw(st.integers(2, 3)))])
    if kind == "cls":
        return Layout([Segment("cls", 1, 1, 1), Segment("image", 1, draw(_side(6)), draw(_side(6)))])
    # LLaVA-OneVision AnyRes: base view, then the stitched crops whose last column is the newline markers
    return Layout([Segment("base", 1, draw(_side(4)), draw(_side(4))),
                   Segment("crops", 1, draw(_side(4)), draw(st.integers(2, 6)), newline=True)])


@st.composite
def video_layouts(draw):
    segs = [Segment("frames", draw(st.integers(1, 4)), draw(_side(4)), draw(_side(4)))]
    if draw(st.booleans()):  # LLaVA-OneVision clips end with one newline token
        segs.append(Segment("newline", 1, 1, 1))
    return Layout(segs)


@st.composite
def audio_layouts(draw):
    return Layout([Segment("audio", 1, 1, draw(st.integers(1, 48)))])


LAYOUTS = {"image": image_layouts(), "video": video_layouts(), "audio": audio_layouts()}


def layouts_for(method):
    return st.one_of(*[LAYOUTS[m] for m in method.info.modalities])


@st.composite
def cases(draw, method):
    """(tokens [B, N, D], layout, k, signals) for ``method``: degenerate tokens and budgets included."""
    layout = draw(layouts_for(method))
    n = layout.n
    b = draw(st.integers(1, 3))
    d = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["random", "constant", "duplicated", "scaled"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, d, generator=g)
    if kind == "constant":
        tokens[:] = tokens[:, :1]
    elif kind == "duplicated":  # every token twice in a row
        tokens = tokens[:, : (n + 1) // 2].repeat_interleave(2, dim=1)[:, :n].contiguous()
    elif kind == "scaled":
        tokens = tokens * draw(st.sampled_from([1e-3, 30.0]))
    k = draw(st.one_of(st.just(1), st.just(n), st.integers(1, n)))
    stage_llm = method.info.stage == "llm"
    sig = synthetic_signals(b, n, d if stage_llm else 6, seed=seed + 1, t=draw(st.integers(1, 5)))
    if kind == "constant":  # degenerate everywhere: one key, uniform attention
        for name in ("keys", "projected"):
            sig[name][:] = sig[name][:, :1]
        for name in ("cls_attention", "last_attention", "speech"):
            sig[name] = torch.full_like(sig[name], 1.0 / n if name != "speech" else 0.5)
    c = method(retain=1.0)
    names = set(c.requires) | set(c.optional)
    sig = {name: (v.to(dtype) if v.is_floating_point() else v) for name, v in sig.items() if name in names}
    return tokens.to(dtype), layout, k, sig, kind


# ---- 1. the contract -------------------------------------------------------------------------------------------------
def check_contract(out, tokens, k, kind, convex=True):
    b, n, d = tokens.shape
    assert out.tokens.shape == (b, k, d), (out.tokens.shape, (b, k, d))
    assert out.tokens.dtype == tokens.dtype, (out.tokens.dtype, tokens.dtype)
    assert out.source.shape == (b, n) and out.index.shape == (b, k)
    assert out.source.dtype == torch.long and out.index.dtype == torch.long
    assert bool(torch.isfinite(out.tokens).all()), "finite in, finite out"
    for i in range(b):
        idx, src = out.index[i], out.source[i]
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < n
        assert bool((src >= -1).all() and (src < k).all())
        assert torch.equal(src[idx], torch.arange(k)), "every representative maps to its own slot"
        sizes = torch.bincount(src[src >= 0], minlength=k)
        assert bool((sizes >= 1).all()) and int(sizes.sum()) + int((src < 0).sum()) == n, "merged sizes + dropped = N"
        kept = src >= 0
        first = torch.full((k,), n, dtype=torch.long).scatter_reduce(0, src[kept], torch.arange(n)[kept], "amin")
        assert torch.equal(first, idx), "index is the first member of each output's group"
    if kind == "constant" and convex:  # any selection, mean or interpolation of one vector is that vector
        ref = tokens[:, :1].float().expand(b, k, d)
        torch.testing.assert_close(out.tokens.float(), ref, atol=TOL[tokens.dtype] * 10, rtol=TOL[tokens.dtype] * 10)
    if k == n:
        assert torch.equal(out.tokens, tokens) and torch.equal(out.source, torch.arange(n).expand(b, n))


@pytest.mark.parametrize("method", TENSOR_METHODS, ids=lambda m: m.info.name)
def test_compress_contract(method):
    @PROFILE
    @given(case=cases(method))
    def run(case):
        tokens, layout, k, sig, kind = case
        c = method(tokens=1)
        out = c.compress(tokens, grid=layout, k=k, **sig)
        check_contract(out, tokens, k, kind, convex=method.info.name not in NOT_CONVEX)
        again = c.compress(tokens.clone(), grid=layout, k=k, **{n: v.clone() for n, v in sig.items()})
        assert torch.equal(again.tokens, out.tokens) and torch.equal(again.source, out.source), "deterministic"
        if tokens.dtype == torch.float32 and tokens.shape[0] > 1:  # each row is compressed as it is alone
            for i in range(tokens.shape[0]):
                one = c.compress(tokens[i: i + 1], grid=layout, k=k, **{n: v[i: i + 1] for n, v in sig.items()})
                assert torch.equal(one.source[0], out.source[i]) and torch.equal(one.index[0], out.index[i])
                torch.testing.assert_close(one.tokens[0], out.tokens[i], atol=1e-5, rtol=1e-5)

    run()


# ---- 2. bad values ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", TENSOR_METHODS, ids=lambda m: m.info.name)
def test_bad_values_are_clear_errors(method):
    @settings(PROFILE, max_examples=max(2, PROFILE.max_examples // 2))
    @given(case=cases(method), bad=st.sampled_from(["nan", "inf", "int", "rank", "layout", "k0", "kbig", "kfloat",
                                                     "signal_dtype"]))
    def run(case, bad):
        tokens, layout, k, sig, _ = case
        n = tokens.shape[1]
        c = method(tokens=1)
        kw = {"grid": layout, "k": k, **sig}
        if bad in ("nan", "inf"):
            tokens = tokens.clone()
            tokens[-1, n // 2, 0] = float("nan") if bad == "nan" else float("inf")
            with pytest.raises(ValueError, match="finite"):
                c.compress(tokens, **kw)
        elif bad == "int":
            with pytest.raises(TypeError, match="floating point"):
                c.compress(tokens.long(), **kw)
        elif bad == "rank":
            with pytest.raises(TypeError, match=r"\[B, N, D\]"):
                c.compress(tokens[0], **kw)
        elif bad == "layout":
            with pytest.raises(ValueError, match="does not tile"):
                c.compress(tokens, **{**kw, "grid": [(1, n + 1)]})
        elif bad in ("k0", "kbig"):
            with pytest.raises(ValueError, match=r"k must be"):
                c.compress(tokens, **{**kw, "k": 0 if bad == "k0" else n + 1})
        elif bad == "kfloat":
            with pytest.raises(TypeError, match=r"k must be an int"):
                c.compress(tokens, **{**kw, "k": k + 0.5})
        else:
            assume(sig)
            name = sorted(sig)[0]
            wrong = sig[name].float() if sig[name].dtype == torch.bool else (sig[name] * 100).long()
            with pytest.raises(TypeError, match=f"signal {name}"):
                c.compress(tokens, **{**kw, name: wrong})

    run()


# ---- 3. frame selectors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", FRAME_SELECTORS, ids=lambda m: m.info.name)
def test_frame_selectors_pick_k_ascending_distinct_frames(method):
    @settings(PROFILE, max_examples=max(2, PROFILE.max_examples // 2))
    @given(t=st.integers(1, 8), side=st.integers(14, 20), seed=st.integers(0, 2**16),
           kind=st.sampled_from(["random", "constant", "duplicated"]), data=st.data())
    def run(t, side, seed, kind, data):
        frames = torch.rand(t, 3, side, side, generator=torch.Generator().manual_seed(seed))
        if kind == "constant":
            frames[:] = frames[:1]
        elif kind == "duplicated":
            frames = frames[: (t + 1) // 2].repeat_interleave(2, dim=0)[:t].contiguous()
        k = data.draw(st.integers(1, t))
        keep = method(retain=1.0).select(frames, k)
        assert keep.dtype == torch.long and keep.shape == (k,)
        assert bool((keep[1:] > keep[:-1]).all()) and int(keep.min()) >= 0 and int(keep.max()) < t
        assert torch.equal(method(retain=1.0).select(frames.clone(), k), keep), "deterministic"
        with pytest.raises(ValueError, match="k must be"):
            method(retain=1.0).select(frames, t + 1)
        with pytest.raises(TypeError, match="frames must be"):
            method(retain=1.0).select(frames[0], 1)

    run()


# ---- 4. the patch over random batch compositions ---------------------------------------------------------------------
# (case, method): an image model before and inside the LLM, a video model, an audio LLM
PATCH_PAIRS = [("llava", "visionzip"), ("llava", "fastv"), ("qwen2_vl", "tome"), ("qwen2_vl_video", "dycoke"),
               ("qwen2_audio", "vad_prune")]


@st.composite
def batches(draw):
    """1-4 samples, 0-3 media items each (at least one in the batch), random prompt lengths and text ids."""
    n = draw(st.integers(1, 4))
    samples = []
    for i in range(n):
        before = [1] + draw(st.lists(st.integers(5, 39), max_size=6))
        after = draw(st.lists(st.integers(5, 39), min_size=1, max_size=6))
        samples.append(Sample(before, draw(st.integers(0, 3)), after, seed=draw(st.integers(1, 9))))
    if all(s.n_items == 0 for s in samples):
        samples[draw(st.integers(0, n - 1))].n_items = 1
    return samples


def _text_only(sample, batch):
    """A sample without media alone, as a processor gives it: its text ids (and, where the batch has them, zero
    ``mm_token_type_ids``), no media tensors; the model computes its own positions (no padding)."""
    ids = torch.tensor([sample.before + sample.after])
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = torch.zeros_like(ids, dtype=batch["mm_token_type_ids"].dtype)
    return out


def _logits(model, inputs, case, own_positions=False):
    if own_positions:
        with torch.no_grad():
            return model(**inputs).logits
    hook = CASES[case].position_ids
    mask = inputs["attention_mask"]
    pos = hook(model, inputs) if hook is not None else (mask.long().cumsum(-1) - 1).clamp(min=0)
    pos = pos if isinstance(pos, dict) else {"position_ids": pos}
    with torch.no_grad():
        return model(**inputs, **pos).logits


@pytest.mark.parametrize("case,name", PATCH_PAIRS, ids=lambda v: v)
def test_patch_random_batches_equal_each_sample_alone(case, name):
    model = built(case)

    @PATCH_PROFILE
    @given(samples=batches(), retain=st.sampled_from([0.25, 0.5, 1.0]))
    def run(samples, retain):
        make = CASES[case].make_inputs
        c = tz.get(name, retain=retain)
        batch = make(model, samples)
        with c(model):
            logits = _logits(model, batch, case)
            singles = []
            for s in samples:
                if s.n_items == 0:
                    singles.append(_logits(model, _text_only(s, batch), case, own_positions=True)[0])
                else:
                    singles.append(_logits(model, make(model, [s]), case)[0])
        for i, single in enumerate(singles):
            n = single.shape[0]
            torch.testing.assert_close(logits[i, -n:], single, atol=1e-4, rtol=1e-4)

    run()
