"""Qwen3-VL (tokenzip/adapters/qwen3_vl.py): positions of kept image and video tokens, DeepStack rows before and
inside the LLM (against an oracle that runs the decoder layers on the kept set by hand), mixed image + video prompts,
the MoE class, and the Qwen3-VL video input builder against the installed processor's own code."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tokenzip as tz
from tokenzip.compat import cache_kwarg, output_cache
from tokenzip.testing import (
    CASES,
    IMAGE_TOKEN,
    QWEN_VIDEO_TOKEN,
    Sample,
    default_samples,
    left_pad,
    qwen3_vl_image_inputs,
    qwen3_vl_positions,
    qwen3_vl_video_inputs,
    tiny_qwen3_vl,
)

from conftest import built

torch.set_num_threads(1)


def mixed_inputs(model, samples):
    """Each sample: its images (the image case's prompt) followed by its clips (the video case's prompt), so every
    row holds both modalities; clips differ in length across samples."""
    img = qwen3_vl_image_inputs(model, [Sample(s.before, s.n_items, [], s.seed) for s in samples])
    vid = qwen3_vl_video_inputs(model, [Sample([], s.n_items, s.after, s.seed) for s in samples])
    rows = []
    for b in range(len(samples)):
        rows.append(img["input_ids"][b][img["attention_mask"][b].bool()].tolist()
                    + vid["input_ids"][b][vid["attention_mask"][b].bool()].tolist())
    ids, mask = left_pad(rows)
    types = (ids == IMAGE_TOKEN).int() + 2 * (ids == QWEN_VIDEO_TOKEN).int()
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types,
            "pixel_values": img["pixel_values"], "image_grid_thw": img["image_grid_thw"],
            "pixel_values_videos": vid["pixel_values_videos"], "video_grid_thw": vid["video_grid_thw"]}


MAKERS = {"image": qwen3_vl_image_inputs, "video": qwen3_vl_video_inputs, "mixed": mixed_inputs}
TOKEN = {"image": IMAGE_TOKEN, "video": QWEN_VIDEO_TOKEN}


class _LMCapture:
    """Every call of the language model: its position ids, visual mask and DeepStack rows."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("position_ids", "visual_pos_masks", "deepstack_visual_embeds",
                                                      "attention_mask")})

    def remove(self):
        self.handle.remove()


def _in_sequence_order(inputs, stats_b, b):
    """The sample's item stats in sequence order, each with the sequence slots of its placeholders."""
    ids = inputs["input_ids"][b]
    out = []
    for modality, ms in stats_b.items():
        where = (ids == TOKEN[modality]).nonzero().flatten()
        start = 0
        for it in ms.items:
            out.append((it, where[start: start + it.tokens_in]))
            start += it.tokens_in
    return sorted(out, key=lambda p: int(p[1][0]))


@pytest.mark.parametrize("kind", ["image", "video", "mixed"])
def test_kept_tokens_keep_their_uncompressed_positions_and_decoding_continues(kind):
    """Every kept image/video token and every text token (timestamps included) reaches the LLM with exactly the
    column the model's own get_rope_index gives the full sequence; generate()'s first decoding step sits at the
    uncompressed model's next position (rope_deltas)."""
    model = built("qwen3_vl")
    inputs = MAKERS[kind](model, default_samples())
    full = qwen3_vl_positions(model, inputs)
    # mixed prompts: an image method (clips pass whole) and a video method (images pass whole)
    methods = {"image": [tz.ClsTopK(retain=0.4)], "video": [tz.DyCoke(retain=0.4)],
               "mixed": [tz.ClsTopK(retain=0.4), tz.DyCoke(retain=0.3)]}[kind]
    for c in methods:
        cap = _LMCapture(model)
        try:
            with c(model), torch.no_grad():
                model(**inputs)
                deltas = model.model.rope_deltas.clone()
                gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        finally:
            cap.remove()
        assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
        prefill, decode = cap.calls[0], cap.calls[2]  # forward, then generate's prefill and its first step
        removed = 0
        for b, stats_b in enumerate(c.last_stats):
            keep = inputs["attention_mask"][b].bool().clone()
            for modality in TOKEN:
                keep &= inputs["input_ids"][b] != TOKEN[modality]
            for it, slots in _in_sequence_order(inputs, stats_b, b):
                keep[slots[it.index]] = True
                removed += it.tokens_in - it.tokens_out
            expected = full[1:, b][:, keep]
            lm_mask = prefill["attention_mask"][b].bool()
            got = prefill["position_ids"][1:, b][:, lm_mask]
            assert torch.equal(got, expected), f"sample {b}"
            top = int(full[1:, b][:, inputs["attention_mask"][b].bool()].max())
            assert decode["position_ids"][1:, b, -1].tolist() == [top + 1] * 3
            # the model's own definition: where decoding continues when no position ids are passed
            assert int(deltas[b]) == top + 1 - int(lm_mask.sum())
        assert removed > 0
    one = MAKERS[kind](model, default_samples()[:1])
    top = int(qwen3_vl_positions(model, one)[1:].max())
    cap = _LMCapture(model)
    try:
        with methods[0](model), torch.no_grad():
            out = model(**one, use_cache=True)
            model(input_ids=out.logits[:, -1:].argmax(-1),  # no position ids: rope_deltas
                  **{cache_kwarg(model): output_cache(out)})
    finally:
        cap.remove()
    assert cap.calls[-1]["position_ids"][-3:, 0, -1].tolist() == [top + 1] * 3


@pytest.mark.parametrize("method,kind", [(tz.ClsTopK, "image"), (tz.ToMe, "image"), (tz.AvgPool, "mixed"),
                                         (tz.DyCoke, "video"), (tz.PLLaVAPool, "video")])
def test_deepstack_rows_before_the_llm_are_the_kept_tokens_rows(method, kind):
    """Pre-LLM: at every DeepStack level the LLM receives, at each kept visual slot, the mean of the level's rows
    over the output token's source group (a kept token: its own row, exactly), from the model's own features."""
    model = built("qwen3_vl")
    inputs = MAKERS[kind](model, default_samples())
    with torch.no_grad():
        feats = {}
        if "pixel_values" in inputs:
            feats["image"] = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        if "pixel_values_videos" in inputs:
            feats["video"] = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    c = method(retain=0.4)
    cap = _LMCapture(model)
    try:
        with c(model), torch.no_grad():
            model(**inputs)
    finally:
        cap.remove()
    call = cap.calls[0]
    levels = call["deepstack_visual_embeds"]
    assert len(levels) == len(model.config.vision_config.deepstack_visual_indexes) == 3
    expected = [[] for _ in levels]
    counter = {m: 0 for m in feats}
    per_sample = []
    for b, stats_b in enumerate(c.last_stats):
        per_sample.append(_in_sequence_order(inputs, stats_b, b))
    # the model's items of a modality are numbered over the batch in sequence order
    for b, pairs in enumerate(per_sample):
        for it, _ in pairs:
            i = counter[it.modality]
            counter[it.modality] += 1
            for j in range(len(levels)):
                rows = feats[it.modality].deepstack_features[j][i]
                for slot in range(it.tokens_out):
                    members = (it.source == slot).nonzero().flatten()
                    expected[j].append(rows[members].mean(0) if members.numel() > 1 else rows[members[0]])
    for j, level in enumerate(levels):
        assert level.shape[0] == int(call["visual_pos_masks"].sum()) == len(expected[j])
        torch.testing.assert_close(level, torch.stack(expected[j]), atol=1e-6, rtol=1e-6)
        if method in (tz.ClsTopK, tz.DyCoke):  # pure selections: bit for bit
            assert torch.equal(level, torch.stack(expected[j]))


def _oracle_logits(model, inputs, stats, layer):
    """The decoder run by hand on the kept set, one sample at a time: layers < ``layer`` on the full sequence (the
    stock model, captured at layer ``layer``'s input), then only the text and the kept visual tokens, with their
    original cos/sin, a causal mask over them, and every DeepStack level still to come added at the kept visual
    tokens (each its own position's row). Returns per sample the logits at the kept positions and those positions."""
    lm = model.model.language_model
    box = {}
    h_in = lm.layers[layer].register_forward_pre_hook(
        lambda m, a, kw: box.update(h=(a[0] if a else kw["hidden_states"]), pe=kw["position_embeddings"]),
        with_kwargs=True)
    h_lm = lm.register_forward_pre_hook(lambda m, a, kw: box.update(vmask=kw["visual_pos_masks"],
                                                                     deep=kw["deepstack_visual_embeds"]),
                                        with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, position_ids=qwen3_vl_positions(model, inputs))
    finally:
        h_in.remove()
        h_lm.remove()
    vmask, deep = box["vmask"], box["deep"]
    row_of = (vmask.flatten().long().cumsum(0) - 1).view(vmask.shape)
    out = []
    for b, stats_b in enumerate(stats):
        keep = inputs["attention_mask"][b].bool().clone()
        for modality in TOKEN:
            keep &= inputs["input_ids"][b] != TOKEN[modality]
        for it, slots in _in_sequence_order(inputs, stats_b, b):
            keep[slots[it.index]] = True
        cols = keep.nonzero().flatten()
        h = box["h"][b: b + 1, cols]
        pe = tuple(t[b: b + 1, cols] for t in box["pe"])
        n = cols.numel()
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        with torch.no_grad():
            for i in range(layer, len(lm.layers)):
                h = lm.layers[i](h, attention_mask=causal, position_embeddings=pe, position_ids=None)
                if i < len(deep):
                    visual = vmask[b, cols]
                    h = h.clone()
                    h[0, visual] += deep[i][row_of[b, cols[visual]]].to(h.dtype)
            out.append((model.lm_head(lm.norm(h))[0], cols))
    return out


@pytest.mark.parametrize("kind", ["image", "video", "mixed"])
def test_llm_stage_fastv_before_the_last_deepstack_layer_equals_kept_set_oracle(kind):
    """FastV at decoder layer 2 of a 4-layer LLM with DeepStack on 3 layers (levels added after layers 0, 1, 2):
    level 2 is added on the shortened sequence, at the kept visual tokens only; the logits at every kept position
    equal the oracle that feeds the kept set through layers 2-3 by hand."""
    model = tiny_qwen3_vl(text_layers=4, deepstack=(0, 1, 2))
    inputs = MAKERS[kind](model, default_samples())
    c = tz.FastV(retain=0.3, layer=2)
    seen = []
    hook = model.model.language_model.layers[2].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        with c(model), torch.no_grad():
            logits = model(**inputs, position_ids=qwen3_vl_positions(model, inputs)).logits
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert seen[0] < inputs["input_ids"].shape[1]  # layer 2 ran on the shortened sequence
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    assert all(it.stages == [(2, it.tokens_out)] and it.tokens_out < it.tokens_in
               for s in c.last_stats for ms in s.values() for it in ms.items)
    for b, (ref, cols) in enumerate(_oracle_logits(model, inputs, c.last_stats, 2)):
        torch.testing.assert_close(logits[b, cols], ref, atol=2e-5, rtol=1e-4)


def test_compose_pre_llm_then_llm_stage_with_deepstack():
    """A pre-LLM method per modality shortens the prompt (DeepStack rows cut alike), then FastV prunes the kept
    tokens inside the LLM before the last DeepStack layer: the LLM-stage items are the kept placeholder runs (a
    clip's spread over its temporal grids), and every DeepStack level after the stage is cut again."""
    model = tiny_qwen3_vl(text_layers=4, deepstack=(0, 1, 2))
    inputs = mixed_inputs(model, default_samples())
    pos = qwen3_vl_positions(model, inputs)
    with torch.no_grad():
        ref = model(**inputs, position_ids=pos).logits
    for pre in (tz.ToMe, tz.DyCoke):
        with tz.compose(pre(retain=1.0), tz.FastV(retain=1.0, layer=2))(model), torch.no_grad():
            assert (model(**inputs, position_ids=pos).logits - ref).abs().max() <= 1e-5
        c = tz.compose(pre(retain=0.5), tz.FastV(retain=0.5, layer=2))
        with c(model), torch.no_grad():
            model(**inputs)
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
        first, second = c.parts
        n_pre = [it.tokens_out for s in first.last_stats for ms in s.values() for it in ms.items]
        n_llm = [it.tokens_in for s in second.last_stats for ms in s.values() for it in ms.items
                 if it.modality in pre.info.modalities]
        assert n_llm == [n for n, it in zip(n_pre, [it for s in first.last_stats for ms in s.values()
                                                     for it in ms.items])
                         if it.modality in pre.info.modalities]
        assert all(it.tokens_out < it.tokens_in for s in second.last_stats for ms in s.values() for it in ms.items)


def test_llm_stage_restores_deepstack_step():
    model = built("qwen3_vl")
    lm = model.model.language_model
    with tz.FastV(retain=0.3)(model):
        assert "_deepstack_process" in lm.__dict__
    assert "_deepstack_process" not in lm.__dict__
    with pytest.raises(KeyboardInterrupt):
        with tz.FastV(retain=0.3)(model):
            raise KeyboardInterrupt
    assert "_deepstack_process" not in lm.__dict__


def test_signals_and_layouts():
    """Offered signals per item; a clip's layout is frames(t, h/2, w/2) over all its temporal grids."""
    model = built("qwen3_vl")
    inputs = mixed_inputs(model, default_samples())
    ad = tz.adapters.adapter_for(model)
    items = ad.encode(inputs, frozenset({"cls_attention", "keys", "projected", "text", "text_mask"}))
    grids = {"image": inputs["image_grid_thw"].tolist(), "video": inputs["video_grid_thw"].tolist()}
    seen = {"image": 0, "video": 0}
    for it in items:
        t, h, w = grids[it.modality][seen[it.modality]]
        seen[it.modality] += 1
        seg = it.grid.segments[0]
        assert (seg.kind, seg.t, seg.h, seg.w) == ("image" if it.modality == "image" else "frames", t, h // 2, w // 2)
        n = t * h * w // 4
        assert it.tokens.shape == (n, 32) and it.signals["keys"].shape[0] == n
        assert it.signals["cls_attention"].shape == (n,) and bool((it.signals["cls_attention"] > 0).all())
        # each patch's attention received, summed over its grid's queries, divided by their number, mean over heads:
        # a grid's patches sum to 1, and a token is the mean of its four patches
        torch.testing.assert_close(it.signals["cls_attention"].view(t, -1).sum(-1), torch.full((t,), 0.25))
    assert seen == {"image": 4, "video": 4}
    assert sorted({it.sample for it in items}) == [0, 1, 2]


def test_moe_class():
    """Qwen3VLMoeForConditionalGeneration takes the same adapter: lossless at retain=1, and a pre-LLM and an
    LLM-stage method run and generate."""
    model = tiny_qwen3_vl(moe=True)
    inputs = mixed_inputs(model, default_samples())
    pos = qwen3_vl_positions(model, inputs)
    with torch.no_grad():
        ref = model(**inputs, position_ids=pos).logits
    for method in (tz.ToMe, tz.FastV):
        with method(retain=1.0)(model), torch.no_grad():
            assert (model(**inputs, position_ids=pos).logits - ref).abs().max() <= 1e-5
        c = method(retain=0.4)
        with c(model), torch.no_grad():
            model(**inputs, position_ids=pos)
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
        assert sum(it.tokens_out for s in c.last_stats for ms in s.values() for it in ms.items) < \
            sum(it.tokens_in for s in c.last_stats for ms in s.values() for it in ms.items)


def test_bad_inputs():
    model = built("qwen3_vl")
    inputs = qwen3_vl_image_inputs(model, default_samples())
    with tz.ToMe(retain=0.5)(model):
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
        with pytest.raises(ValueError, match="image_grid_thw"):
            model(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
        with pytest.raises(ValueError, match="patches"):
            model(**{**inputs, "pixel_values": inputs["pixel_values"][:-4]})
    with pytest.raises(ValueError, match=r"in \[1, 2\]"):
        tz.InEncoder(tz.ToMe(retain=0.5), layer=3)(model)


# ---- the Qwen3-VL video input builder (tokenzip/video.py) against the installed processor's own code --------------
def test_video_pixels_match_the_processor_patchify_and_resize():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    from tokenzip.video import qwen3_vl_video_pixels, qwen3_vl_video_processor, synthetic_clip

    proc = qwen3_vl_video_processor(size={"shortest_edge": 64 * 64, "longest_edge": 4 * 96 * 96})
    clip = synthetic_clip(5, 70, 100, seed=3).frames
    pixels, grid = qwen3_vl_video_pixels([clip], proc)
    h, w = smart_resize(5, 70, 100, temporal_factor=2, factor=32, min_pixels=64 * 64, max_pixels=4 * 96 * 96)
    assert grid.tolist() == [[3, h // 16, w // 16]]
    x = torch.nn.functional.interpolate(torch.as_tensor(clip).permute(0, 3, 1, 2), size=[h, w], mode="bicubic",
                                        align_corners=False, antialias=True).float()
    x = ((x / 255) - 0.5) / 0.5
    ref, t, gh, gw = proc.patchify(x[None], patch_size=16, merge_size=2, temporal_patch_size=2)
    assert (t, gh, gw) == (3, h // 16, w // 16)
    torch.testing.assert_close(pixels, ref[0], atol=1e-5, rtol=1e-5)


def test_video_prompt_matches_the_processor():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    from tokenzip.video import qwen3_vl_timestamps, qwen3_vl_video_prompt

    indices, fps = [0, 12, 25, 37, 50], 25.0
    grid = torch.tensor([[3, 8, 12]])
    ours = qwen3_vl_video_prompt(grid[0].tolist(), qwen3_vl_timestamps(indices, fps, 2), 2)
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                           video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                           vision_end_token="<|vision_end|>")
    fake._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(fake, *a)
    meta = SimpleNamespace(fps=fps, frames_indices=np.array(indices))
    theirs = Qwen3VLProcessor.replace_video_token(fake, {"video_grid_thw": grid, "video_metadata": [meta]}, 0)
    assert ours == theirs
    assert ours.startswith("<0.2 seconds><|vision_start|>") and ours.count("<|video_pad|>") == 3 * 24


def test_cases_are_registered():
    assert CASES["qwen3_vl"].modalities == ("image",) and CASES["qwen3_vl_video"].modalities == ("video",)
    assert CASES["qwen3_vl"].stages == ("pre_llm", "encoder", "llm")


def _word_tokenizer():
    """A word-level tokenizer whose Qwen3-VL special tokens have the tiny model's ids (the timestamps' words and
    digits are ordinary text tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tokenzip.testing import QWEN_VISION_END, QWEN_VISION_START

    vocab = {"<pad>": 0, "<unk>": 3, "<|video_pad|>": QWEN_VIDEO_TOKEN, "<|vision_start|>": QWEN_VISION_START,
             "<|vision_end|>": QWEN_VISION_END}
    for i, w in enumerate(["describe", "the", "video", "seconds", "<", ">", "."] + [str(d) for d in range(10)]):
        vocab[w] = 10 + i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])


def test_video_inputs_builder_feeds_the_model():
    """tokenzip.video.qwen3_vl_video_inputs: two prompts with clips of different lengths and sizes give a batch the
    model takes (its placeholder count check), with the timestamps as text; a method compresses it."""
    from tokenzip.video import qwen3_vl_video_inputs as build_inputs
    from tokenzip.video import qwen3_vl_video_processor, synthetic_clip

    model = built("qwen3_vl_video")
    proc = qwen3_vl_video_processor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 4 * 32 * 32})
    texts = ["<|vision_start|><|video_pad|><|vision_end|> describe the video",
             "describe <|vision_start|><|video_pad|><|vision_end|> the video ."]
    clips = [synthetic_clip(4, 32, 48, seed=1), synthetic_clip(5, 40, 40, seed=2)]
    inputs = build_inputs(_word_tokenizer(), texts, clips, proc)
    grids = inputs["video_grid_thw"].tolist()
    assert [g[0] for g in grids] == [2, 3]
    for b, (t, h, w) in enumerate(grids):
        ids = inputs["input_ids"][b]
        assert int((ids == QWEN_VIDEO_TOKEN).sum()) == t * h * w // 4
        assert int((ids == 102).sum()) == t + 1  # the template's own vision_start, and one per temporal grid
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == QWEN_VIDEO_TOKEN)
    with torch.no_grad():
        ref = model(**inputs).logits
    assert ref.shape[:2] == inputs["input_ids"].shape
    c = tz.DyCoke(retain=0.5)
    with c(model), torch.no_grad():
        model(**inputs)
    assert [it.tokens_in for s in c.last_stats for it in s["video"].items] == [t * h * w // 4 for t, h, w in grids]


# ---- stage "input": "frames" (whole timestamped blocks of temporal grids) and "resolution" ---------------------------
def _video_plan(model, inputs, keeps):
    adapter = tz.adapters.adapter_for(model)
    plan = adapter.input_plan(inputs, "frames")
    for p, keep in zip(plan, keeps):
        p.keep = torch.tensor(keep)
    targets = [len(keep) * p.tokens // p.extra["thw"][0] for p, keep in zip(plan, keeps)]
    return adapter, plan, targets


@pytest.mark.parametrize("outer_pair", [True, False], ids=["template-pair", "collapsed"])
def test_kept_temporal_grids_are_the_clip_the_processor_gives_for_them(outer_pair):
    """Dropping grids (the first ones too) leaves exactly the prompt and pixels the processor gives a clip of the
    kept frames: each kept grid after its own timestamp, the dropped grids' timestamps and markers gone."""
    model = built("qwen3_vl_video")
    samples = default_samples()
    inputs = qwen3_vl_video_inputs(model, samples, outer_pair=outer_pair)
    assert [g[0] for g in inputs["video_grid_thw"].tolist()] == [3, 3, 2, 2]
    keeps = [[1, 2], [2], [1], [0, 1]]
    adapter, plan, targets = _video_plan(model, inputs, keeps)
    new, maps = adapter.rescale_inputs(inputs, "frames", plan, targets)
    oracle = qwen3_vl_video_inputs(model, samples, outer_pair=outer_pair, grids=keeps)
    assert set(new) == set(oracle)
    for key, value in oracle.items():
        assert torch.equal(new[key], value), key
    # timestamp text (5 tokens in the tiny vocabulary) + <vision_start> + <vision_end> per dropped grid
    assert [p.text_removed for p in plan] == [7, 14, 7, 0]
    for p, keep, (source, index) in zip(plan, keeps, maps):
        per_grid = p.tokens // p.extra["thw"][0]
        assert sorted(set((index // per_grid).tolist())) == keep
        assert torch.equal(source[index], torch.arange(index.numel())) and int((source >= 0).sum()) == index.numel()
    with torch.no_grad():  # the kept grids' tokens are the ones the full clip gives them
        full = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        short = model.model.get_video_features(new["pixel_values_videos"], new["video_grid_thw"]).pooler_output
    for f, s, (_, index) in zip(full, short, maps):
        torch.testing.assert_close(s, f[index], atol=1e-5, rtol=1e-5)


def test_frame_selection_through_the_patch_equals_the_stock_model_on_the_kept_frames():
    model = built("qwen3_vl_video")
    samples = default_samples()
    inputs = qwen3_vl_video_inputs(model, samples)
    c = tz.get("uniform_frames", tokens=8)  # 12-token clips (3 or 2 grids): 2 grids of 4 or 1 of 6; 18: 1 of 6
    with c(model), torch.no_grad():
        out = model(**inputs).logits
    keeps = []
    for stats in c.last_stats:
        for it in stats["video"].items:
            per_grid = it.tokens_in // it.grid.segments[0].t
            keeps.append(sorted(set((it.index // per_grid).tolist())))
            assert it.text_removed == 7 * (it.grid.segments[0].t - len(keeps[-1]))
    assert keeps == [[0, 2], [0], [0], [0]]
    with torch.no_grad():
        ref = model(**qwen3_vl_video_inputs(model, samples, grids=keeps)).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_frames_and_resolution_leave_the_other_modality_whole():
    model = built("qwen3_vl")
    inputs = mixed_inputs(model, default_samples())
    for name, budget in (("uniform_frames", {"retain": 0.5}), ("resize", {"tokens": 3})):
        c = tz.get(name, **budget)
        adapter = tz.adapters.adapter_for(model)
        plan = adapter.input_plan(inputs, c.reduces)
        assert {p.modality for p in plan} == set(c.info.modalities)
        targets = [c.target(p.tokens, p.achievable) for p in plan]
        assert any(k < p.tokens for p, k in zip(plan, targets))
        c.choose(plan, targets)
        new, _ = adapter.rescale_inputs(inputs, c.reduces, plan, targets)
        other = ("pixel_values", "image_grid_thw") if name == "uniform_frames" else \
            ("pixel_values_videos", "video_grid_thw")
        for key in other:
            assert torch.equal(new[key], inputs[key])
        assert "position_ids" not in new
        assert torch.equal(new["mm_token_type_ids"], (new["input_ids"] == IMAGE_TOKEN).int()
                           + 2 * (new["input_ids"] == QWEN_VIDEO_TOKEN).int())
        with torch.no_grad():
            ref = model(**new).logits
            with c(model):
                out = model(**inputs).logits
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_frames_need_the_processors_block_layout():
    model = built("qwen3_vl_video")
    inputs = qwen3_vl_video_inputs(model, default_samples(), outer_pair=False)
    keeps = [[1, 2], [2], [1], [0, 1]]
    # a clip written as one run of placeholders (Qwen2-VL's layout): no per-grid markers
    one_run = dict(inputs)
    ids = inputs["input_ids"].clone()
    ids[(ids == 102) | (ids == 103)] = 7
    one_run["input_ids"] = ids
    adapter, plan, targets = _video_plan(model, one_run, keeps)
    with pytest.raises(ValueError, match="each temporal grid of a clip must be"):
        adapter.rescale_inputs(one_run, "frames", plan, targets)
    # no template pair and a first timestamp that does not start like the second: where it begins is unknown
    odd = dict(inputs)
    ids = inputs["input_ids"].clone()
    first = (ids[0] == 102).nonzero().flatten()[0]  # sample 0's first grid: its timestamp is the 5 tokens before
    ids[0, first - 5] = 53
    odd["input_ids"] = ids
    adapter, plan, targets = _video_plan(model, odd, keeps)
    with pytest.raises(ValueError, match="first temporal grid's timestamp"):
        adapter.rescale_inputs(odd, "frames", plan, targets)
    plan[0].keep = torch.tensor([2, 1])
    with pytest.raises(ValueError, match="ascending distinct"):
        adapter.rescale_inputs(inputs, "frames", plan, targets)


def test_compose_frames_then_a_pre_llm_method_counts_both():
    model = built("qwen3_vl_video")
    inputs = qwen3_vl_video_inputs(model, default_samples())
    c = tz.compose(tz.get("uniform_frames", tokens=8), tz.get("dycoke", retain=0.5))
    seen = []
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"].clone()), with_kwargs=True)
    try:
        with c(model), torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    assert sum(it.text_removed for s in c.last_stats for it in s["video"].items) > 0
    for b, (stats, first) in enumerate(zip(c.last_stats, c.parts[0].last_stats)):
        items = stats["video"].items
        # the chained stats carry what the frame stage removed: 7 text tokens per dropped grid
        for it, f in zip(items, first["video"].items):
            kept = len(set((f.index // (f.tokens_in // f.grid.segments[0].t)).tolist()))
            assert it.text_removed == f.text_removed == 7 * (f.grid.segments[0].t - kept)
        removed = sum(it.tokens_in - it.tokens_out + it.text_removed for it in items)
        assert int(seen[0][b].sum()) == int(inputs["attention_mask"][b].sum()) - removed


# ---- stage "encoder": merge units between vision blocks, DeepStack taps carried -------------------------------------
@pytest.mark.parametrize("cut", [1, 2])
@pytest.mark.parametrize("kind", ["image", "video"])
def test_encoder_cut_carries_the_deepstack_taps(kind, cut):
    """Clips keep whole temporal grids (attention segments), so everything after the cut must equal the full pass at
    the kept units; images keep every other unit, so the levels tapped at or before the cut must (those after it
    run on the kept units only: their shapes)."""
    from tokenzip.output import CompressOutput

    model = built(f"qwen3_vl{'_video' if kind == 'video' else ''}")
    inputs = MAKERS[kind](model, default_samples())
    adapter = tz.adapters.adapter_for(model)
    adapter.set_encoder_layer(cut)
    outs, kept = [], []
    try:
        items = adapter.encode(inputs, frozenset())
        for it in items:
            seg = it.grid.segments[0]
            per, n = seg.h * seg.w, it.tokens.shape[0]
            assert it.tokens.shape == (n, 4 * model.config.vision_config.hidden_size)
            if kind == "video":
                idx = torch.cat([torch.arange(f * per, (f + 1) * per) for f in sorted({0, seg.t - 1})])
            else:
                idx = torch.arange(0, n, 2)
            source = torch.full((n,), -1, dtype=torch.long)
            source[idx] = torch.arange(idx.numel())
            outs.append(CompressOutput(it.tokens[idx][None], source[None], idx[None]))
            kept.append(idx)
        new = adapter.rebuild(inputs, items, outs)
    finally:
        adapter.release()
    enc = new["mm_encoder_outputs"][kind]
    with torch.no_grad():
        get = model.model.get_video_features if kind == "video" else model.model.get_image_features
        px, grid = ("pixel_values_videos", "video_grid_thw") if kind == "video" else ("pixel_values", "image_grid_thw")
        full = get(inputs[px], inputs[grid], return_dict=True)
    taps = list(model.model.visual.deepstack_visual_indexes)
    assert len(enc.deepstack_features) == len(taps)
    for i, idx in enumerate(kept):
        rows = [full.pooler_output[i], *[level[i] for level in full.deepstack_features]]
        ours = [enc.pooler_output[i], *[level[i] for level in enc.deepstack_features]]
        exact = [kind == "video"] + [kind == "video" or b <= cut - 1 for b in taps]
        for mine, theirs, same in zip(ours, rows, exact):
            assert mine.shape == (idx.numel(), theirs.shape[-1])
            if same:
                torch.testing.assert_close(mine, theirs[idx], atol=1e-5, rtol=1e-5)
    # the prompt keeps the kept units' placeholders: every other token of an image, whole grids of a clip
    assert int((new["input_ids"] == TOKEN[kind]).sum()) == sum(idx.numel() for idx in kept)


@pytest.mark.parametrize("kind", ["image", "video", "mixed"])
def test_encoder_schedule_is_lossless_at_retain_one_and_reaches_the_budget(kind):
    model = built("qwen3_vl")
    inputs = MAKERS[kind](model, default_samples())
    pos = qwen3_vl_positions(model, inputs)
    name = "tome" if kind == "image" else "dycoke"  # dycoke merges across a clip's frames
    with torch.no_grad():
        ref = model(**inputs, position_ids=pos).logits
        with tz.InEncoder(tz.get(name, retain=1.0), layer=(1, 2))(model):
            same = model(**inputs, position_ids=pos).logits
    torch.testing.assert_close(same, ref, atol=1e-4, rtol=1e-4)
    c = tz.InEncoder(tz.get(name, retain=0.5), layer=(1, 2))
    cap = _LMCapture(model)
    try:
        with c(model), torch.no_grad():
            model(**inputs, position_ids=pos)
    finally:
        cap.remove()
    items = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    squeezed = [it for it in items if it.modality in c.info.modalities]
    assert squeezed and all(it.tokens_out == c.budget.count(it.tokens_in) < it.tokens_in for it in squeezed)
    assert all(it.tokens_out == it.tokens_in for it in items if it.modality not in c.info.modalities)
    call = cap.calls[0]
    kept = sum(it.tokens_out for it in items)
    assert int(call["visual_pos_masks"].sum()) == kept
    assert len(call["deepstack_visual_embeds"]) == 3
    assert all(level.shape[0] == kept for level in call["deepstack_visual_embeds"])
