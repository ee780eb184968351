"""Qwen2-Audio adapter (pre-LLM and LLM stage) and SpeechPrune, on the tiny random-weight case."""

import pytest
import torch
from test_llm_stage import _logits  # the same stock forward with mask-derived positions

import tokenzip as tz
from tokenzip.adapters import adapter_for
from tokenzip.adapters.speech import energy_speech
from tokenzip.methods.speechprune import SpeechPrune
from tokenzip.testing import (
    CASES,
    QWEN_AUDIO_LENGTHS,
    QWEN_AUDIO_TOKEN,
    Sample,
    default_samples,
    qwen2_audio_clip_tokens,
)

from conftest import built

CASE = "qwen2_audio"


def _inputs(model, samples=None):
    return CASES[CASE].make_inputs(model, samples or default_samples())


def _clip_lengths(samples):
    return [QWEN_AUDIO_LENGTHS[(s.seed + j) % len(QWEN_AUDIO_LENGTHS)] for s in samples for j in range(s.n_items)]


def test_token_counts_per_clip_follow_feature_mask():
    model = built(CASE)
    samples = default_samples()
    inputs = _inputs(model, samples)
    expected = [qwen2_audio_clip_tokens(n) for n in _clip_lengths(samples)]
    assert len(set(expected)) > 1  # the case really has clips of different lengths
    c = tz.get("avgpool", retain=0.5)
    with c(model):
        _logits(model, inputs)
    got = [it.tokens_in for s in c.last_stats for it in s["audio"].items]
    assert got == expected
    assert [it.tokens_out for s in c.last_stats for it in s["audio"].items] == [max(1, round(n / 2)) for n in expected]
    assert sum(expected) == int((inputs["input_ids"] == QWEN_AUDIO_TOKEN).sum())


def test_items_are_the_models_own_audio_features():
    """The adapter's (uncompressed) tokens, projected, are exactly what the stock model writes into the audio slots."""
    model = built(CASE)
    inputs = _inputs(model)
    seen = {}
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True)
    try:
        _logits(model, inputs)
    finally:
        h.remove()
    adapter = adapter_for(model)
    items = adapter.encode(inputs, frozenset({"projected"}))
    ref = seen["e"][inputs["input_ids"] == QWEN_AUDIO_TOKEN]
    got = torch.cat([it.signals["projected"] for it in items])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["avgpool", "tome", "attn_topk", "vad_prune"])
def test_retain_one_is_exact_and_generates_the_same(name):
    model = built(CASE)
    inputs = _inputs(model)
    ref = _logits(model, inputs)
    ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with tz.get(name, retain=1.0)(model):
        out = _logits(model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("name", ["avgpool", "atome", "attn_topk"])
def test_batch_of_clips_with_different_lengths_equals_singles(name):
    """Two clips of different lengths in one sample, next to single-clip samples: every clip is compressed and read
    exactly as on its own, and generation of the batch equals the singles'."""
    model = built(CASE)
    samples = [Sample([1, 5], 2, [6, 7, 8], seed=1), Sample([1, 9, 10, 11], 1, [12], seed=3),
               Sample([1], 1, [13, 14], seed=4)]
    batch = _inputs(model, samples)
    c = tz.get(name, retain=0.4)
    with c(model):
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
        src = [[it.source.tolist() for it in s["audio"].items] for s in c.last_stats]
        for i, s in enumerate(samples):
            one = _inputs(model, [s])
            g = model.generate(**one, max_new_tokens=4, do_sample=False)[0, one["input_ids"].shape[1]:]
            assert torch.equal(gen[i, batch["input_ids"].shape[1]:][: g.numel()], g)  # a single may stop at EOS
            assert src[i] == [it.source.tolist() for it in c.last_stats[0]["audio"].items]


def test_clips_that_do_not_match_the_prompt_raise():
    model = built(CASE)
    inputs = _inputs(model)
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == QWEN_AUDIO_TOKEN).nonzero()[0, 0]] = 5  # one placeholder short
    with tz.get("avgpool", retain=0.5)(model):
        with pytest.raises(ValueError, match="audio clips do not match the prompt"):
            _logits(model, {**inputs, "input_ids": ids})
        extra = {**inputs, "input_features": torch.cat([inputs["input_features"], inputs["input_features"][:1]]),
                 "feature_attention_mask": torch.cat([inputs["feature_attention_mask"],
                                                      inputs["feature_attention_mask"][:1]])}
        with pytest.raises(ValueError, match="audio clips do not match the prompt"):
            _logits(model, extra)
        with pytest.raises(ValueError, match="feature_attention_mask"):
            _logits(model, {k: v for k, v in inputs.items() if k != "feature_attention_mask"})
        with pytest.raises(ValueError, match="feature_attention_mask must be"):
            _logits(model, {**inputs, "feature_attention_mask": inputs["feature_attention_mask"][:, :10]})


def test_signals_map_through_the_stride_two_pooling():
    """cls_attention == the EAGER attention weights of the last encoder layer (stock tower, the model's key-padding
    mask) received by each valid frame, mean over valid queries and heads, summed over each pooled pair; speech ==
    the Whisper adapter's energy score on 4 mel frames per token; projected == the projector's output."""
    from transformers.masking_utils import create_bidirectional_mask

    eager = built(CASE, "eager")
    inputs = _inputs(eager)
    items = adapter_for(eager).encode(inputs, frozenset({"cls_attention", "keys", "speech", "projected", "text"}))
    tower = eager.model.audio_tower
    feats, fmask = inputs["input_features"], inputs["feature_attention_mask"]
    frames, sizes = tower._get_feat_extract_output_lengths(fmask.sum(-1))
    width = feats.shape[-1] // 2
    valid = (torch.arange(width)[None] < frames[:, None]).long()
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(feats.shape[0], width, 1),
                                     attention_mask=valid)
    with torch.no_grad():
        att = tower(feats, attention_mask=mask, output_attentions=True).attentions[-1]  # [clips, H, W, W]
    for i, it in enumerate(items):
        f, n = int(frames[i]), int(sizes[i])
        assert float(att[i, :, :f, f:].abs().sum()) == 0.0  # padding keys are masked
        received = att[i, :, :f, :f].mean(dim=(0, 1))
        torch.testing.assert_close(it.signals["cls_attention"], received[: 2 * n].view(n, 2).sum(1), atol=1e-6,
                                   rtol=1e-5)
        assert it.signals["keys"].shape == (n, tower.config.d_model // tower.config.encoder_attention_heads)
        torch.testing.assert_close(it.signals["speech"], energy_speech(feats[i, :, : 4 * n], n))
        torch.testing.assert_close(it.signals["projected"], eager.model.multi_modal_projector(it.tokens))
        assert it.signals["text"].shape[0] == int(((inputs["input_ids"][it.sample] != QWEN_AUDIO_TOKEN)
                                                   & inputs["attention_mask"][it.sample].bool()).sum())


def test_signal_keys_match_the_encoder_layer_in_context():
    """keys/cls_attention come from the last encoder layer's input as the model computes it (under its mask):
    recompute them from a hook on the stock model's own forward."""
    model = built(CASE)
    inputs = _inputs(model)
    attn = model.model.audio_tower.layers[-1].self_attn
    cap = {}
    h = attn.register_forward_pre_hook(lambda m, a, kw: cap.update(x=a[0] if a else kw["hidden_states"]),
                                       with_kwargs=True)
    try:
        _logits(model, inputs)
    finally:
        h.remove()
    items = adapter_for(model).encode(inputs, frozenset({"keys", "cls_attention"}))
    frames, sizes = model.model.audio_tower._get_feat_extract_output_lengths(inputs["feature_attention_mask"].sum(-1))
    for i, it in enumerate(items):
        f, n = int(frames[i]), int(sizes[i])
        x = cap["x"][i: i + 1, :f]
        k = attn.k_proj(x).view(1, f, 4, -1).transpose(1, 2)
        q = attn.q_proj(x).view(1, f, 4, -1).transpose(1, 2) * attn.scaling
        received = torch.softmax(q @ k.transpose(-1, -2), dim=-1).mean(dim=(1, 2))[0]
        torch.testing.assert_close(it.signals["keys"], k.mean(1)[0, : 2 * n].view(n, 2, -1).mean(1), atol=1e-6,
                                   rtol=1e-5)
        torch.testing.assert_close(it.signals["cls_attention"], received[: 2 * n].view(n, 2).sum(1), atol=1e-6,
                                   rtol=1e-5)


def test_raw_audio_gives_silero_speech_and_is_consumed():
    """``raw_audio`` (one 16 kHz waveform per clip) -> Silero VAD per 40 ms token; never reaches the model."""
    import numpy as np

    from tokenzip.adapters.speech import silero_speech

    model = built(CASE)
    inputs = _inputs(model)
    clips = inputs["input_features"].shape[0]
    g = np.random.default_rng(0)
    waves = [g.standard_normal(640 * 20).astype(np.float32) * 0.1 for _ in range(clips)]
    items = adapter_for(model).encode({**inputs, "raw_audio": waves}, frozenset({"speech"}))
    for it, w in zip(items, waves):
        n = it.tokens.shape[0]
        ref = silero_speech(w, n, 640)
        assert ref is not None
        torch.testing.assert_close(it.signals["speech"], ref)
    c = tz.get("vad_prune", retain=0.5)
    with c(model):
        gen = model.generate(**inputs, raw_audio=waves, max_new_tokens=2, do_sample=False)
        assert torch.equal(gen[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        with pytest.raises(ValueError, match="raw_audio"):
            _logits(model, {**inputs, "raw_audio": waves[:1]})


def test_adapter_refuses_image_methods():
    model = built(CASE)
    with pytest.raises(TypeError, match="audio"):
        tz.get("visionzip", retain=0.5)(model)
    with pytest.raises(TypeError, match="audio"):
        tz.get("fastv", retain=0.5)(model)


# ---- stage "llm": SpeechPrune ---------------------------------------------------------------------------------------
def test_speechprune_phases_on_tensors():
    """Phase 1 keeps the ceil(phase1 * k) tokens most similar to the text; phase 2 ranks only those by attention."""
    tokens = torch.eye(6).unsqueeze(0)  # token i is the unit vector e_i
    text = torch.zeros(1, 2, 6)
    text[0, 0, 4] = 1.0  # the text is similar to tokens 4 and 5 only
    text[0, 1, 5] = 1.0
    att = torch.tensor([[[0.5, 0.4, 0.05, 0.0, 0.03, 0.02]]]).expand(1, 2, 6)
    common = {"text": text, "text_mask": torch.ones(1, 2, dtype=torch.bool), "text_attention": att,
              "last_attention": att[:, 0]}
    out = SpeechPrune(tokens=1, phase1=2.0).compress(tokens, grid=(1, 6), **common)
    assert out.index.tolist() == [[4]]  # 0 and 1 get the most attention but fail the similarity phase
    out = SpeechPrune(tokens=1, phase1=6.0).compress(tokens, grid=(1, 6), **common)
    assert out.index.tolist() == [[0]]  # phase 1 passes everything: pure attention ranking
    no_text = {**common, "text": text[:, :0], "text_mask": torch.ones(1, 0, dtype=torch.bool),
               "text_attention": att[:, :0]}
    out = SpeechPrune(tokens=2).compress(tokens, grid=(1, 6), **no_text)
    assert out.index.tolist() == [[0, 1]]  # no text after the clip: the last token's attention


@pytest.mark.parametrize("kw", [{"layer": 0}, {"layer": 1.5}, {"phase1": 0.5}, {"phase1": True}])
def test_speechprune_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        SpeechPrune(retain=0.5, **kw)


# SpeechPrune against the masking oracle: tests/test_llm_stage.py::test_equals_the_masking_oracle_logits_and_generation
# (parametrised over every LLM-stage method x every adapter with an LLM stage, Qwen2-Audio included)


def test_compose_pre_llm_then_speechprune():
    model = built(CASE)
    inputs = _inputs(model)
    c = tz.compose(tz.get("avgpool", retain=0.5), SpeechPrune(retain=0.5))
    with c(model):
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        _logits(model, inputs)
    assert torch.equal(gen[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    expected = [qwen2_audio_clip_tokens(n) for n in _clip_lengths(default_samples())]
    got = [(it.tokens_in, it.tokens_out) for s in c.last_stats for it in s["audio"].items]
    assert got == [(n, max(1, round(max(1, round(n * 0.5)) * 0.5))) for n in expected]
