"""Regressions for defects found on configurations the registered cases do not cover (issue 21): tiny models of the
real classes with other sizes (deeper LLMs, odd widths), left-padded batches of 3 samples, and clips of different
lengths and sizes than tokenzip.testing's."""

import re
import warnings

import pytest
import torch

import tokenzip as tz
from tokenzip import testing as T
from tokenzip.budget import Budget, BudgetFloorWarning
from tokenzip.video import qwen_video_pixels, qwen_video_tokens, synthetic_clip

# per sample: (text before, [(frames, height, width) per clip], text after); every clip a different length and size
CLIPS = [(3, [(5, 36, 20)], 7), (1, [(7, 20, 44), (3, 28, 28)], 2), (6, [(4, 44, 36)], 1)]


def _qwen_deep(kind: str, attn: str = "sdpa"):
    """Qwen2-VL (4 LLM layers) or Qwen2.5-VL (5 layers, block 0 full attention), widths 40 / 24, 5 heads and 1 KV
    head: FrameFusion merges before layers 1 .. L - 1, which a 2-layer LLM never reaches."""
    import transformers

    text = T._qwen_vl_text_config()
    text.update(num_hidden_layers=4 if kind == "qwen2_vl" else 5, hidden_size=40, intermediate_size=72,
                num_attention_heads=5, num_key_value_heads=1)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=24, hidden_size=40, num_heads=2, mlp_ratio=2, patch_size=4,
                      temporal_patch_size=2, spatial_merge_size=2)
        prefix = "Qwen2VL"
    else:
        vision = dict(depth=3, hidden_size=24, intermediate_size=40, num_heads=2, patch_size=4, temporal_patch_size=2,
                      spatial_merge_size=2, window_size=16, out_hidden_size=40, fullatt_block_indexes=[0])
        prefix = "Qwen2_5_VL"
    cfg = getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=text, **T._qwen_vl_token_ids())
    torch.manual_seed(3)
    cls = getattr(transformers, f"{prefix}ForConditionalGeneration")
    return cls._from_config(cfg, attn_implementation=attn).eval()


def _qwen_clips(model, spec=CLIPS, fps=(2.0, 1.0, 3.0, 2.0)):
    settings = T.qwen_clip_settings(model)
    clips = [synthetic_clip(f, h, w, seed=7 * b + j).frames for b, (_, cl, _) in enumerate(spec)
             for j, (f, h, w) in enumerate(cl)]
    pixels, grid = qwen_video_pixels(clips, settings)
    counts = iter(qwen_video_tokens(grid, settings.merge_size))
    rows = []
    for b, (before, cl, after) in enumerate(spec):
        row = [1] + [20 + (3 * b + i) % 50 for i in range(before)]
        for _ in cl:
            row += [T.QWEN_VISION_START] + [T.QWEN_VIDEO_TOKEN] * next(counts) + [T.QWEN_VISION_END]
        rows.append(row + [30 + (b + i) % 40 for i in range(after)])
    ids, mask = T.left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": 2 * (ids == T.QWEN_VIDEO_TOKEN).int(),
           "pixel_values_videos": pixels, "video_grid_thw": grid}
    if type(model).__name__.startswith("Qwen2_5_VL"):
        out["second_per_grid_ts"] = torch.tensor([settings.temporal_patch_size / r for r in fps[:grid.shape[0]]])
    return out


def _sources(stats):
    return [[it.source.tolist() for ms in s.values() for it in ms.items] for s in stats]


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_framefusion_generate_keeps_the_clip_layout(kind):
    """generate()'s prefill merges and prunes as forward() does: generate() hands its inner forward() calls the
    encoded features without the clips' grids, and the items must keep the layout of the caller's call."""
    model = _qwen_deep(kind)
    inputs = _qwen_clips(model)
    c = tz.get("framefusion", retain=0.3, threshold=0.2)
    with c(model):
        with torch.no_grad():
            logits = model(**inputs, position_ids=T.qwen_vl_media_positions(model, inputs)).logits[:, -1]
        forward_stats = _sources(c.last_stats)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        generate_stats = _sources(c.last_stats)
    assert any(it.stages and len(it.stages) > 1 for s in c.last_stats for ms in s.values() for it in ms.items), \
        "the case must exercise FrameFusion's merge stages"
    assert generate_stats == forward_stats
    torch.testing.assert_close(out.logits[0], logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]], logits.argmax(-1))


def _omni_batch(model, spec, av: bool):
    """Qwen2.5-Omni thinker inputs from explicit lengths: per sample ``(seed, before, [mel frames per clip], after)``;
    ``av``: each clip is a video of ``ceil(frames / 100)`` seconds (one temporal grid per second, 4 x 4 patches)
    with that soundtrack, interleaved (``use_audio_in_video``). Features are padded to the longest clip (the
    feature extractor's ``padding="longest"``)."""
    from tokenzip.av import omni_audio_tokens, omni_block

    cfg = model.config
    v = cfg.vision_config
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    frames = max(x for _, _, row, _ in spec for x in row)
    rows, feats, fmasks, pixels, thw = [], [], [], [], []
    for b, before, lengths, after in spec:
        row = [1] + [20 + (5 * b + i) % 60 for i in range(before)]
        for j, length in enumerate(lengths):
            f, m = T._omni_mel(length, frames, 100 * b + j)
            feats.append(f)
            fmasks.append(m)
            n = omni_audio_tokens(length, cfg)
            if av:
                t = -(-length // 100)
                g = torch.Generator().manual_seed(1000 + 10 * b + j)
                pixels.append(torch.randn(t * 4 * 4, patch_dim, generator=g))
                thw.append([t, 4, 4])
                row += omni_block(cfg, video_grid=(t, 4, 4), second_per_grid=1.0, audio_tokens=n,
                                  use_audio_in_video=True)
            else:
                row += omni_block(cfg, audio_tokens=n)
        rows.append(row + [30 + (b + i) % 50 for i in range(after)])
    ids, mask = T.left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "input_features": torch.stack(feats),
           "feature_attention_mask": torch.stack(fmasks)}
    if av:
        out.update(pixel_values_videos=torch.cat(pixels), video_grid_thw=torch.tensor(thw, dtype=torch.long),
                   video_second_per_grid=torch.ones(len(thw)), use_audio_in_video=True)
    return out


# 83 and 147 valid mel frames: the last token's 4-frame window runs past the clip (83 = 4 * 21 - 1), so a score that
# read the batch's padding there differed between the clip alone (no padding) and in a batch with longer clips
OMNI_SPEC = [(0, 2, [131], 5), (1, 4, [102, 147], 1), (2, 1, [83], 3)]


@pytest.mark.parametrize("av", [False, True], ids=["audio", "soundtrack"])
def test_vad_prune_omni_batch_equals_singles(av):
    model = T.tiny_qwen2_5_omni("sdpa")
    c = tz.get("vad_prune", retain=0.4)
    batch = _omni_batch(model, OMNI_SPEC, av)
    with c(model), torch.no_grad():
        logits = model(**batch, position_ids=T.qwen2_5_omni_positions(model, batch)).logits
        batch_stats = _sources(c.last_stats)
        for i, s in enumerate(OMNI_SPEC):
            one = _omni_batch(model, [s], av)
            single = model(**one, position_ids=T.qwen2_5_omni_positions(model, one)).logits[0]
            assert _sources(c.last_stats)[0] == batch_stats[i], f"sample {i}"
            torch.testing.assert_close(logits[i, -single.shape[0]:], single, atol=1e-4, rtol=1e-4)


FRAME_SELECTORS = [m for m in tz.METHODS if getattr(m, "reduces", None) == "frames"]


@pytest.mark.parametrize("method", FRAME_SELECTORS, ids=lambda m: m.info.name)
def test_frame_selector_floor_is_reported_never_silent(method):
    """A budget under one temporal grid (the least a Qwen-VL clip can be given): each clip gets one grid (the
    documented floor), the call warns with the smallest retain that is met, the stats mark the items over budget,
    the LLM sees exactly what the stats say, and at that retain nothing is over budget."""
    model = T.tiny_qwen2_vl("sdpa")
    inputs = _qwen_clips(model)
    grids = inputs["video_grid_thw"]
    per_grid = [int(h * w) // 4 for _, h, w in grids.tolist()]
    n = [int(t) * g for t, g in zip(grids[:, 0].tolist(), per_grid)]
    lm = model.model.language_model
    seen = []
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(int(kw["attention_mask"].sum())), with_kwargs=True)
    c = method(retain=0.2)
    try:
        with c(model), pytest.warns(BudgetFloorWarning, match=r"retain=0\.\d+ is the smallest budget") as caught:
            with torch.no_grad():
                model(**inputs)
    finally:
        h.remove()
    items = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    assert [it.tokens_in for it in items] == n
    assert [it.budget for it in items] == [Budget(retain=0.2).count(x) for x in n]
    assert [it.tokens_out for it in items] == per_grid  # one temporal grid each: the floor
    assert all(it.over_budget for it in items)
    assert seen[0] == int(inputs["attention_mask"].sum()) - sum(n) + sum(per_grid)
    fix = float(re.search(r"retain=([\d.]+) is the smallest", str(caught[0].message)).group(1))
    c2 = method(retain=fix)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetFloorWarning)
        with c2(model), torch.no_grad():
            model(**inputs)
    assert not any(it.over_budget for s in c2.last_stats for ms in s.values() for it in ms.items)


def test_bench_flags_rows_over_budget():
    from tokenzip.bench.report import main_table

    row = {"kind": "method", "method": "uniform_frames", "retain": 0.2, "tokens_in": 200, "tokens_out": 100,
           "over_budget": 3, "ttft_s": 1.0, "encoder_s": 0.1, "compress_s": 0.0, "prefill_s": 0.5, "other_s": 0.4,
           "decode_s_per_token": 0.01, "peak_mem_bytes": 1 << 20, "flops": 1e9, "speedup": 1.0,
           "oracle_speedup": 1.0, "overhead_vs_oracle": 1.0, "flop_speedup": 1.0, "amdahl_bound": 1.0}
    assert "200→100 (floor: 3 over budget)" in main_table([row])
    assert "(floor" not in main_table([dict(row, over_budget=0)])
