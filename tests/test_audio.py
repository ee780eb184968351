"""Audio methods (atome, attn_topk, vad_prune), the Whisper adapter on a tiny random config, audio input rules and
the audio benchmark helpers. The invariant suite covers every audio method x the "whisper" case on top of this."""

import numpy as np
import pytest
import torch

import tokenzip as tz
from tokenzip.adapters.speech import energy_speech, silero_speech
from tokenzip.methods.atome import adjacent_groups
from tokenzip.testing import CASES, default_samples
from tokenzip.zoo.whisper import features, prepare_audio

from conftest import built


def _runs(*lengths, d=8, seed=0):
    """Tokens made of runs of identical vectors (one random direction per run)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        v = torch.randn(d, generator=g)
        rows += [v] * n
    return torch.stack(rows).unsqueeze(0)


# ---- atome --------------------------------------------------------------------------------------------------------
def test_atome_merges_identical_neighbours_first():
    x = _runs(3, 2, 4, 1)
    out = tz.get("atome", tokens=4).compress(x)
    assert out.groups(0) == [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9]]
    torch.testing.assert_close(out.tokens[0], x[0, [0, 3, 5, 9]])


@pytest.mark.parametrize("k", [1, 2, 7, 19])
def test_atome_groups_are_contiguous_and_exact(k):
    x = torch.randn(1, 20, 6, generator=torch.Generator().manual_seed(k))
    out = tz.get("atome", tokens=k).compress(x)
    assert out.tokens.shape[1] == k
    src = out.source[0]
    assert bool((src >= 0).all()) and bool((src[1:] - src[:-1] >= 0).all())  # contiguous runs, in order
    for slot, members in enumerate(out.groups(0)):
        torch.testing.assert_close(out.tokens[0, slot], x[0, members].mean(0))


def test_adjacent_groups_respects_barriers_while_it_can():
    x = torch.ones(6, 4)  # all identical: only the barrier decides
    allowed = torch.tensor([True, True, False, True, True])
    g = adjacent_groups(x, 2, allowed=allowed)
    assert g.tolist() == [0, 0, 0, 1, 1, 1]


def test_atome_rejects_bad_step():
    with pytest.raises(ValueError, match="step"):
        tz.get("atome", retain=0.5, step=0.9)


# ---- attn_topk ----------------------------------------------------------------------------------------------------
def test_attn_topk_keeps_most_attended_in_order():
    x = torch.randn(1, 10, 4)
    att = torch.tensor([[0.0, 9, 1, 8, 0, 0, 7, 0, 0, 0]])
    out = tz.get("attn_topk", tokens=3).compress(x, cls_attention=att)
    assert out.index[0].tolist() == [1, 3, 6]


def test_attn_topk_segments_spread_the_budget():
    att = torch.zeros(1, 12)
    att[0, :6] = torch.arange(6, 0, -1).float() + 10  # all the attention in the first half
    out = tz.get("attn_topk", tokens=4, segments=2).compress(torch.randn(1, 12, 4), cls_attention=att)
    kept = out.index[0].tolist()
    assert sum(i < 6 for i in kept) == 2 and sum(i >= 6 for i in kept) == 2
    with pytest.raises(ValueError, match="segments"):
        tz.get("attn_topk", retain=0.5, segments=0)


# ---- vad_prune ----------------------------------------------------------------------------------------------------
def test_vad_prune_spends_budget_on_speech_and_keeps_a_silence_token():
    x = torch.randn(1, 20, 4)
    speech = torch.zeros(1, 20)
    speech[0, 5:15] = 0.9  # 10 speech frames
    out = tz.get("vad_prune", tokens=6, silence=0.34, reduce="select").compress(x, speech=speech)
    groups = out.groups(0)
    silence = [g for g in groups if not 5 <= g[0] < 15]
    # round(0.34 * 6) = 2 tokens for non-speech, one per pause (a pause token never spans two pauses)
    assert silence == [list(range(5)), list(range(15, 20))]
    speech_tokens = [g for g in groups if g not in silence]
    assert len(speech_tokens) == 4 and all(len(g) == 1 and 5 <= g[0] < 15 for g in speech_tokens)
    one = tz.get("vad_prune", tokens=6, silence=0.1).compress(x, speech=speech)
    assert sum(1 for g in one.groups(0) if not 5 <= g[0] < 15) == 1  # at least one token, the longer pause


@pytest.mark.parametrize("reduce", ["merge", "pool", "select"])
def test_vad_prune_keeps_all_speech_when_budget_allows(reduce):
    x = torch.randn(1, 20, 4)
    speech = torch.zeros(1, 20)
    speech[0, [2, 3, 10]] = 0.8
    out = tz.get("vad_prune", tokens=8, reduce=reduce).compress(x, speech=speech)
    singles = [g[0] for g in out.groups(0) if len(g) == 1]
    assert {2, 3, 10} <= set(singles) | {g[0] for g in out.groups(0)}
    for pos in (2, 3, 10):  # each speech frame is its own output token, unchanged
        slot = int(out.source[0, pos])
        torch.testing.assert_close(out.tokens[0, slot], x[0, pos])
    assert out.tokens.shape[1] == 8


def test_vad_prune_without_speech_treats_everything_as_speech():
    x = torch.randn(1, 12, 4)
    out = tz.get("vad_prune", tokens=4, reduce="pool").compress(x, speech=torch.zeros(1, 12))
    assert out.groups(0) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_vad_prune_rejects_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        tz.get("vad_prune", retain=0.5, threshold=1.5)
    with pytest.raises(ValueError, match="reduce"):
        tz.get("vad_prune", retain=0.5, reduce="magic")
    with pytest.raises(ValueError, match="needs signals"):
        tz.get("vad_prune", retain=0.5).compress(torch.randn(1, 8, 4))


@pytest.mark.parametrize("name", ["random", "avgpool", "tome", "divprune", "dpc_knn"])
def test_generic_methods_work_on_1d_audio_layouts(name):
    if name not in {m.name for m in tz.methods()}:
        pytest.skip(f"{name} is not registered in this tree")
    x = torch.randn(2, 50, 8)
    out = tz.get(name, tokens=7).compress(x, grid=[(1, 50)])
    assert out.tokens.shape == (2, 7, 8)
    assert bool((out.index[:, 1:] > out.index[:, :-1]).all())  # temporal order preserved


# ---- Whisper adapter (tiny random config) -------------------------------------------------------------------------
def _decoder_lengths(model, fn):
    seen = []
    h = model.model.decoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        out = fn()
    finally:
        h.remove()
    return out, seen


@pytest.mark.parametrize("name", ["vad_prune", "atome", "attn_topk", "avgpool"])
def test_whisper_generate_batch_reads_compressed_frames(name):
    model = built("whisper")
    inputs = CASES["whisper"].make_inputs(model, default_samples())
    c = tz.get(name, retain=0.25)
    with c(model):
        out, seen = _decoder_lengths(model, lambda: model.generate(input_features=inputs["input_features"],
                                                                   max_new_tokens=4, do_sample=False))
    assert out.shape[0] == 3
    assert set(seen) == {c.budget.count(40)}  # every decoding step reads the 10 kept frames
    assert [s["audio"].tokens_out for s in c.last_stats] == [10, 10, 10]


def test_whisper_raw_audio_is_consumed_and_checked():
    model = built("whisper")
    feats = CASES["whisper"].make_inputs(model, default_samples()[:2])["input_features"]
    waves = [np.zeros(16000, dtype=np.float32), np.zeros(8000, dtype=np.float32)]
    c = tz.get("vad_prune", retain=0.5)
    with c(model):
        model.generate(input_features=feats, raw_audio=waves, max_new_tokens=2, do_sample=False)
        assert c.last_stats[0]["audio"].tokens_out == 20
        with pytest.raises(ValueError, match="raw_audio"):
            model.generate(input_features=feats, raw_audio=waves[:1], max_new_tokens=2)
    assert c.last_stats == []  # the latest call failed: no stats of an earlier call are left behind


def test_whisper_adapter_refuses_image_methods():
    with pytest.raises(TypeError, match="audio"):
        tz.get("visionzip", retain=0.5)(built("whisper"))


def test_energy_speech_marks_quiet_tail_and_padding():
    feats = torch.full((16, 80), 0.8)
    feats[:, 60:] = -0.5  # quiet tail (Whisper pads with the floor value)
    p = energy_speech(feats, 40)
    assert bool((p[:30] > 0.5).all()) and bool((p[30:] < 0.05).all())


def test_silero_speech_zero_past_the_audio():
    p = silero_speech(np.zeros(16000, dtype=np.float32), 100)
    if p is None:
        pytest.skip("silero-vad is not installed (energy fallback in use)")
    assert p.shape == (100,) and bool((p[50:] == 0).all()) and float(p.max()) < 0.5  # silence is not speech
    with pytest.raises(ValueError, match="raw_audio"):
        silero_speech(np.array([np.nan] * 100, dtype=np.float32), 10)


# ---- audio input rules --------------------------------------------------------------------------------------------
def test_prepare_audio_conversions():
    mono = prepare_audio(np.ones(1600, dtype=np.float32) * 0.5, 16000)
    assert mono.shape == (1600,) and mono.dtype == np.float32
    stereo = np.stack([np.ones(1600), np.zeros(1600)])  # [channels, samples]
    np.testing.assert_allclose(prepare_audio(stereo, 16000), 0.5)
    np.testing.assert_allclose(prepare_audio(stereo.T, 16000), 0.5)  # [samples, channels]
    assert prepare_audio(np.zeros(44100), 44100).shape == (16000,)  # resampled
    pcm = prepare_audio(np.full(10, 32767, dtype=np.int16), 16000)
    np.testing.assert_allclose(pcm, 1.0)


@pytest.mark.parametrize("wave,sr,match", [
    (np.zeros(0), 16000, "empty"),
    (np.array([0.0, np.nan]), 16000, "NaN"),
    (np.array([0.0, np.inf]), 16000, "NaN"),
    (np.zeros((2, 3, 4)), 16000, "dimensions"),
    (np.zeros((20, 30)), 16000, "channels"),
    (np.zeros(10), 0, "sampling_rate"),
    (np.zeros(10), 16000.5, "sampling_rate"),
])
def test_prepare_audio_rejects_bad_input(wave, sr, match):
    with pytest.raises(ValueError, match=match):
        prepare_audio(wave, sr)


def test_features_reject_long_audio():
    class P:  # never called: the length check comes first
        pass
    with pytest.raises(ValueError, match="30 s"):
        features(P(), [np.zeros(16000 * 31, dtype=np.float32)])


# ---- benchmark helpers --------------------------------------------------------------------------------------------
def test_pack_windows_and_wer():
    from tokenzip.bench.audio import Clip, pack_windows, wer

    clips = [Clip(f"c{i}", np.ones(16000 * 8, dtype=np.float32), f"word{i}") for i in range(7)]
    wins = pack_windows(clips)
    assert [round(w.seconds, 1) for w in wins] == [24.4, 24.4]  # 3 clips + 2 gaps each; a 1-clip rest is dropped
    assert wins[0].text == "word0 word1 word2"
    assert wer(["Mr. Smith went home."], ["mister smith went home"]) == 0.0
    assert wer(["a b c d"], ["a x c d"]) == 0.25


def _cross_attention_masks(model):
    """Records the additive mask each decoder cross-attention receives (after tokenzip's own pre-hooks)."""
    seen = []
    handles = [layer.encoder_attn.register_forward_hook(
        lambda m, a, kw, out: seen.append((kw["key_value_states"].shape[1], kw.get("attention_mask"))),
        with_kwargs=True) for layer in model.model.decoder.layers]
    return seen, handles


def test_whisper_proportional_attention_lives_inside_the_patch():
    model = built("whisper")
    feats = CASES["whisper"].make_inputs(model, default_samples())["input_features"]
    before = {id(h) for layer in model.model.decoder.layers for h in layer.encoder_attn._forward_pre_hooks.values()}
    seen, handles = _cross_attention_masks(model)
    try:
        with tz.get("avgpool", retain=0.25)(model):  # merges 4 frames per token: log(4) on every key
            model.generate(input_features=feats, max_new_tokens=2, do_sample=False)
        assert seen and all(n == 10 and mask is not None for n, mask in seen)
        torch.testing.assert_close(seen[0][1].exp().sum(-1).flatten(), torch.full((3,), 40.0))
        seen.clear()
        with tz.get("random", retain=0.25)(model):  # a pure selection: nothing to rebalance
            model.generate(input_features=feats, max_new_tokens=2, do_sample=False)
        assert seen and all(n == 10 and mask is None for n, mask in seen)
        seen.clear()
        model.generate(input_features=feats, max_new_tokens=2, do_sample=False)  # outside: untouched
        assert seen and all(n == 40 and mask is None for n, mask in seen)
    finally:
        for h in handles:
            h.remove()
    after = {id(h) for layer in model.model.decoder.layers for h in layer.encoder_attn._forward_pre_hooks.values()}
    assert after == before


@pytest.mark.parametrize("method", [tz.get("avgpool", retain=0.25), tz.InEncoder(tz.AToMe(retain=0.25), layer=1)])
def test_whisper_temperature_fallback_reads_compressed_frames(method):
    """Whisper's own temperature fallback re-runs generate() on the rows that failed its thresholds: every decoder
    pass must still read the compressed frames of the right rows, with their proportional attention."""
    model = built("whisper")
    feats = CASES["whisper"].make_inputs(model, default_samples())["input_features"]
    seen, handles = _cross_attention_masks(model)
    encoder_calls = []
    handles.append(model.model.encoder.register_forward_hook(lambda m, a, out: encoder_calls.append(1)))
    try:
        torch.manual_seed(0)
        with method(model):
            out = model.generate(input_features=feats, max_new_tokens=6, temperature=(0.0, 0.5, 1.0),
                                 compression_ratio_threshold=1.0, logprob_threshold=0.0, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    assert out.shape[0] == 3
    assert len(encoder_calls) > 1  # thresholds no random model meets: the fallback re-ran generate()
    assert all(n == 10 for n, _ in seen)
    assert all(torch.allclose(mask.exp().sum(-1), torch.full_like(mask[..., 0], 40.0)) for _, mask in seen)


def test_in_encoder_runs_the_layers_after_the_cut_on_the_kept_tokens():
    model = built("whisper")
    inputs = CASES["whisper"].make_inputs(model, default_samples())
    lengths = []
    h = model.model.encoder.layers[1].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    try:
        c = tz.InEncoder(tz.AToMe(retain=0.25), layer=1)
        with c(model):
            model(**inputs)
    finally:
        h.remove()
    assert lengths == [10]
    assert c.last_stats[0]["audio"].tokens_in == 40 and c.last_stats[0]["audio"].tokens_out == 10


def test_in_encoder_rejects_bad_arguments():
    model = built("whisper")
    with pytest.raises(TypeError, match="method must be a configured"):
        tz.InEncoder(tz.AToMe, layer=1)
    with pytest.raises(ValueError, match="only pre-LLM methods"):
        tz.InEncoder(tz.get("speechprune", retain=0.5), layer=1)
    with pytest.raises(ValueError, match="layer must be an int >= 0"):
        tz.InEncoder(tz.AToMe(retain=0.5), layer=1.5)
    with pytest.raises(ValueError, match="cut 0, before the first layer, is not supported by this adapter"):
        tz.InEncoder(tz.AToMe(retain=0.5), layer=0)(model)
    with pytest.raises(ValueError, match=r"layer must be an int in \[1, 1\]"):
        tz.InEncoder(tz.AToMe(retain=0.5), layer=2)(model)
    with pytest.raises(TypeError, match="stage 'encoder'"):
        tz.InEncoder(tz.AToMe(retain=0.5), layer=1)(built("qwen2_audio"))


def test_whisper_encoder_hands_each_row_its_own_compressed_frames():
    """Rows are matched by value, so a re-run on a subset or a permutation (the temperature fallback) gets the
    right rows and their proportional-attention bias; features that are not rows of the call raise."""
    model = built("whisper")
    feats = CASES["whisper"].make_inputs(model, default_samples())["input_features"]
    patch = tz.get("atome", retain=0.25).apply(model)
    try:
        patch.prepare({"input_features": feats})
        _, hidden, bias = patch.adapter._pending
        out = model.model.encoder(feats[[2, 0]]).last_hidden_state
        torch.testing.assert_close(out, hidden[[2, 0]], atol=0, rtol=0)
        torch.testing.assert_close(patch.adapter._bias, bias[[2, 0]], atol=0, rtol=0)
        with pytest.raises(RuntimeError, match="not rows of the call"):
            model.model.encoder(feats[:1] + 1)
        patch.adapter.release()
        assert model.model.encoder(feats[:1]).last_hidden_state.shape[1] == 40  # outside a call: untouched
    finally:
        patch.remove()


def test_audio_eval_method_specs():
    from tokenzip.bench.audio import audio_methods, make_method

    c = make_method("atome@encoder2", 0.25)
    assert isinstance(c, tz.InEncoder) and c.layer == 2 and c.budget.retain == 0.25
    assert isinstance(make_method("avgpool", 0.5), tz.AvgPool)
    with pytest.raises(ValueError, match="NAME@encoderL"):
        make_method("atome@decoder1", 0.5)
    assert "vad_prune" in audio_methods() and "atome@encoder2" in audio_methods()


def test_bench_routes_whisper_to_the_wer_sweep(monkeypatch, tmp_path):
    import tokenzip.bench.audio as audio_eval
    from tokenzip.bench.cli import run

    calls = []
    monkeypatch.setattr(audio_eval, "run", lambda *a, **k: calls.append(a))
    assert run(["bench", "--model", "whisper-tiny.en", "--methods", "avgpool,atome@encoder1", "--retain", "0.5,0.1",
                "--out", str(tmp_path)]) == 0
    assert calls == [(tmp_path, ["avgpool", "atome@encoder1"], [0.5, 0.1], ["filled", "padded"])]
