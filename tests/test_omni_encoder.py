"""Stage "encoder" on the Qwen-Omni audio towers (tokenzip/adapters/omni_audio_tower.py): retain=1 exact down to the
audio tokens (odd frame counts, clips of different lengths, a padded batch, audio with video), every kept frame in its
original attention window, the signals of the layer before the cut, schedules, refusals, and the model restored after
a failure inside the stage. The registry-driven invariants (exact budget, batch == singles, SDPA == eager, cached ==
uncached, restored, deterministic) run for every pre-LLM method inside the tower from the ``qwen2_5_omni`` /
``qwen2_5_omni_av`` / ``qwen3_omni`` cases in tests/test_invariants.py."""

import copy

import pytest
import torch

import tokenzip as tz
import tokenzip.testing as T
from tokenzip import ops
from tokenzip.adapters import adapter_for
from tokenzip.adapters.qwen2_5_omni import Qwen2_5OmniAdapter
from tokenzip.compat import omni_thinker_parts
from tokenzip.testing import (
    default_samples,
    qwen2_5_omni_audio_inputs,
    qwen2_5_omni_av_inputs,
    qwen2_5_omni_positions,
    tiny_qwen2_5_omni,
)

from conftest import built

# valid mel frames of the audio-only clips: 41, 64, 51, 79 and 34 encoder frames (odd counts leave a frame in no
# pooled pair), 20, 32, 25, 39, 17 LLM tokens
ODD_LENGTHS = [81, 128, 101, 157, 68]


@pytest.fixture
def odd_lengths(monkeypatch):
    monkeypatch.setattr(T, "OMNI_AUDIO_LENGTHS", ODD_LENGTHS)


def _inputs(model, kind):
    if kind == "audio":
        return qwen2_5_omni_audio_inputs(model, default_samples())
    return qwen2_5_omni_av_inputs(model, default_samples(), use_audio_in_video=kind == "av_interleaved")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch, position_ids=qwen2_5_omni_positions(model, batch)).logits


def _audio_tokens(model, batch):
    with torch.no_grad():
        return omni_thinker_parts(model)[0].get_audio_features(
            batch["input_features"], batch["feature_attention_mask"], return_dict=True).last_hidden_state


def _finish_all(adapter, batch, cut=1, keep=None):
    """The adapter's encoder stage by hand: encode at ``cut``, keep the units ``keep[c]`` of each clip (all: None),
    finish the tower. Returns the audio items and each clip's LLM tokens."""
    adapter.set_encoder_layer(cut)
    items = [it for it in adapter.encode(batch, frozenset()) if it.modality == "audio"]
    outs = []
    for c, it in enumerate(items):
        idx = torch.arange(it.tokens.shape[0]) if keep is None else keep[c]
        outs.append(ops.select(it.tokens.unsqueeze(0), idx.unsqueeze(0)))
    try:
        return items, adapter._finish_audio(outs)
    finally:
        adapter.release()


@pytest.mark.parametrize("case", ["qwen2_5_omni", "qwen3_omni"])
@pytest.mark.parametrize("kind", ["audio", "av_interleaved", "av_blocks"])
def test_retain_one_is_exact(case, kind, odd_lengths):
    """retain=1 inside the tower: the audio tokens are bit for bit the model's own (``get_audio_features``), the
    logits bit for bit those of retain=1 at the tower's output (the same rebuilt call), and those of the untouched
    model up to the float reordering of the inputs_embeds path every Omni rebuild takes."""
    model = built(case)
    batch = _inputs(model, kind)
    frames = ((batch["feature_attention_mask"].sum(-1) - 1) // 2 + 1).tolist()
    assert case == "qwen3_omni" or any(f % 2 for f in frames), "the case must have a clip with an odd frame count"
    _, tokens = _finish_all(adapter_for(model), batch)
    assert torch.equal(torch.cat(tokens), _audio_tokens(model, batch))
    ref = _logits(model, batch)
    with tz.get("random", retain=1.0)(model):
        at_output = _logits(model, batch)
    for method in ("random", "tome", "attn_topk"):
        with tz.InEncoder(tz.get(method, retain=1.0), layer=1)(model):
            inside = _logits(model, batch)
        assert torch.equal(inside, at_output), method
    assert (inside - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("case", ["qwen2_5_omni", "qwen3_omni"])
def test_llm_sees_exactly_the_kept_audio_tokens(case, odd_lengths):
    model = built(case)
    batch = _inputs(model, "audio" if case == "qwen2_5_omni" else "av_interleaved")
    c = tz.InEncoder(tz.get("tome", tokens=5), layer=1)
    lm = adapter_for(model).parts().language_model
    seen = []
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"].sum(-1)), with_kwargs=True)
    try:
        with c(model):
            _logits(model, batch)
    finally:
        h.remove()
    for b, stats in enumerate(c.last_stats):
        items = [it for ms in stats.values() for it in ms.items]
        removed = sum(it.tokens_in - it.tokens_out for it in items)
        assert all(it.tokens_out == 5 for it in items if it.modality == "audio")
        assert int(seen[0][b]) == int(batch["attention_mask"][b].sum()) - removed


def _window_model(n_window=24):
    """The tiny Qwen2.5-Omni with attention windows of an even number of encoder frames, so that every pooled pair
    lies inside one window."""
    model = tiny_qwen2_5_omni()
    omni_thinker_parts(model)[0].audio_tower.n_window = n_window
    return model


def test_kept_frames_stay_in_their_original_windows(odd_lengths):
    """The layers after the cut get one attention segment per original window, holding exactly the kept frames of
    that window (a clip's odd last frame always among them): checked against cu_seqlens written down from the
    window size, for a random selection."""
    model = _window_model()
    batch = qwen2_5_omni_audio_inputs(model, default_samples())
    tower = omni_thinker_parts(model)[0].audio_tower
    seen = []
    h = tower.layers[1].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["cu_seqlens"]), with_kwargs=True)
    c = tz.InEncoder(tz.get("random", retain=0.4), layer=1)
    try:
        with c(model):
            _logits(model, batch)
    finally:
        h.remove()
    per_window = 24  # 48 mel frames per chunk -> 24 encoder frames per window
    expected = []
    clips = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    for it, mel in zip(clips, batch["feature_attention_mask"].sum(-1).tolist()):
        frames = (mel - 1) // 2 + 1
        kept = sorted([f for u in it.index.tolist() for f in (2 * u, 2 * u + 1)] + ([frames - 1] if frames % 2 else []))
        windows = [f // per_window for f in kept]
        expected += [windows.count(w) for w in sorted(set(windows))]
    assert seen[-1].tolist() == torch.tensor([0, *expected]).cumsum(0).tolist()


def test_tokens_of_whole_kept_windows_equal_the_full_model(odd_lengths):
    """Keep every unit of windows 0 and 2 of each clip and drop the rest: window attention means those units never
    saw the dropped windows, so their LLM tokens equal the full model's exactly."""
    model = _window_model()
    batch = qwen2_5_omni_audio_inputs(model, default_samples())
    full = _audio_tokens(model, batch)
    sizes = [int(n) for n in Qwen2_5OmniAdapter(model)._audio_token_counts(
        batch["feature_attention_mask"].sum(-1)).tolist()]
    keep = [torch.tensor([u for u in range(n) if (2 * u) // 24 in (0, 2)]) for n in sizes]
    assert all(k.numel() < n for k, n in zip(keep, sizes))
    _, tokens = _finish_all(adapter_for(model), batch, keep=keep)
    start = 0
    for k, n, t in zip(keep, sizes, tokens):
        assert torch.equal(t, full[start: start + n][k])
        start += n


@pytest.mark.parametrize("case", ["qwen2_5_omni", "qwen3_omni"])
def test_signals_at_the_cut_are_those_of_the_layer_before_it(case, odd_lengths):
    """At cut 1 the units' ``cls_attention`` / ``keys`` are what the tower's output signals would be if layer 0
    were its last (the same tower truncated after layer 0); ``speech`` is the output stage's."""
    model = built(case)
    batch = _inputs(model, "audio" if case == "qwen2_5_omni" else "av_interleaved")
    needs = frozenset({"cls_attention", "keys", "speech"})
    adapter = adapter_for(model)
    adapter.set_encoder_layer(1)
    try:
        inside = [it for it in adapter.encode(batch, needs) if it.modality == "audio"]
    finally:
        adapter.release()
    short = copy.deepcopy(model)
    tower = omni_thinker_parts(short)[0].audio_tower
    tower.layers = tower.layers[:1]
    outside = [it for it in adapter_for(short).encode(batch, needs) if it.modality == "audio"]
    assert len(inside) == len(outside) > 0
    for a, b in zip(inside, outside):
        assert set(a.signals) == set(needs)
        for name in needs:
            torch.testing.assert_close(a.signals[name].float(), b.signals[name].float(), atol=0, rtol=0)
    assert "projected" not in adapter.produces("encoder")


@pytest.fixture(scope="module")
def deep_omni():
    return tiny_qwen2_5_omni(audio_layers=4)


def test_schedules_are_exact_at_retain_one_and_end_on_the_budget(deep_omni, odd_lengths):
    model = deep_omni
    batch = qwen2_5_omni_audio_inputs(model, default_samples())
    ref = _logits(model, batch)
    with tz.get("random", retain=1.0)(model):
        at_output = _logits(model, batch)
    assert (at_output - ref).abs().max().item() <= 1e-6
    for layer in ((1, 2, 3), "every", ("last", 2)):
        with tz.InEncoder(tz.get("tome", retain=1.0), layer=layer)(model):
            assert torch.equal(_logits(model, batch), at_output), layer
    tower = omni_thinker_parts(model)[0].audio_tower
    lengths = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: lengths.append(a[0].shape[0]), with_kwargs=True)
             for layer in tower.layers]
    c = tz.InEncoder(tz.get("tome", retain=0.25), layer=(1, 2, 3))
    try:
        with c(model):
            _logits(model, batch)
    finally:
        for h in hooks:
            h.remove()
    clips = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    mel = batch["feature_attention_mask"].sum(-1)
    frames = ((mel - 1) // 2 + 1).tolist()
    sizes = [f // 2 for f in frames]
    assert [(it.tokens_in, it.tokens_out) for it in clips] == [(n, c.budget.count(n)) for n in sizes]
    counts = [tz.encoder.schedule_counts(n, c.budget.count(n), 3) for n in sizes]
    odd = sum(f % 2 for f in frames)
    assert lengths == [sum(frames)] + [2 * sum(k[j] for k in counts) + odd for j in range(3)]


def test_schedule_with_signals_at_every_cut(deep_omni):
    """Attention, speech and text signals are recomputed at each cut of a schedule (OmniZip-like needs)."""
    batch = qwen2_5_omni_audio_inputs(deep_omni, default_samples())
    for method in ("attn_topk", "vad_prune"):
        c = tz.InEncoder(tz.get(method, retain=0.3), layer=(1, 3))
        with c(deep_omni):
            _logits(deep_omni, batch)
        assert all(it.tokens_out == c.budget.count(it.tokens_in) for s in c.last_stats for ms in s.values()
                   for it in ms.items)


def test_cuts_are_checked_against_the_audio_tower():
    model = built("qwen2_5_omni")
    with pytest.raises(ValueError, match=r"audio tower.*\[1, 1\]"):
        tz.InEncoder(tz.get("tome", retain=0.5), layer=2)(model)
    with pytest.raises(ValueError, match=r"audio tower.*\[1, 1\]"):
        tz.InEncoder(tz.get("tome", retain=0.5), layer=(1, 2))(model)
    assert adapter_for(model).encoder_depth() == len(omni_thinker_parts(model)[0].audio_tower.layers) == 2
    with pytest.raises(ValueError, match="compression step"):
        adapter_for(tiny_qwen2_5_omni(audio_layers=3)).set_encoder_layer((1, 2))


def test_a_video_method_inside_the_encoder_compresses_videos_at_the_vision_output():
    """Images/videos of the call are compressed by the method at the vision tower's output (as at stage pre_llm);
    the audio clips, which the video method does not take, reach the LLM whole, exactly."""
    model = built("qwen2_5_omni_av")
    batch = qwen2_5_omni_av_inputs(model, default_samples())
    c = tz.InEncoder(tz.get("dycoke", retain=0.4), layer=1)
    pre = tz.get("dycoke", retain=0.4)
    with c(model):
        inside = _logits(model, batch)
    with pre(model):
        at_output = _logits(model, batch)
    assert torch.equal(inside, at_output)
    assert [[(it.modality, it.tokens_out) for ms in s.values() for it in ms.items] for s in c.last_stats] == \
        [[(it.modality, it.tokens_out) for ms in s.values() for it in ms.items] for s in pre.last_stats]


def test_model_restored_after_a_failure_inside_the_stage(monkeypatch):
    model = built("qwen2_5_omni")
    batch = qwen2_5_omni_audio_inputs(model, default_samples())
    ref = _logits(model, batch)
    tower = omni_thinker_parts(model)[0].audio_tower

    def hooks():
        return {(name, kind, key) for name, m in model.named_modules()
                for kind in ("_forward_hooks", "_forward_pre_hooks") for key in getattr(m, kind)}

    before = hooks()

    def fail(self, frames):
        raise RuntimeError("tail failed")

    with monkeypatch.context() as m:
        m.setattr(Qwen2_5OmniAdapter, "_audio_tail", fail)
        with pytest.raises(RuntimeError, match="tail failed"):
            with tz.InEncoder(tz.get("tome", retain=0.5), layer=1)(model):
                _logits(model, batch)

    def fail_at_cut(module, args, out):
        raise RuntimeError("layer failed")

    h = tower.layers[0].register_forward_hook(fail_at_cut)
    try:
        with pytest.raises(RuntimeError, match="layer failed"):
            with tz.InEncoder(tz.get("tome", retain=0.5), layer=1)(model):
                _logits(model, batch)
    finally:
        h.remove()
    assert hooks() <= before and getattr(model, "_tokenzip_patch", None) is None
    assert torch.equal(_logits(model, batch), ref)
    with tz.InEncoder(tz.get("tome", retain=1.0), layer=1)(model):  # no state left from the failed calls
        assert (_logits(model, batch) - ref).abs().max().item() <= 1e-6
