"""Whisper long-form (issue 21, item 3): input longer than one window goes through Whisper's own sequential
long-form generate() (return_timestamps, batches of recordings of different lengths), and the method compresses
each window as generate() encodes it. Tiny random Whisper: a window is 80 feature frames (40 encoder frames)."""

import pytest
import torch

import tokenzip as tz
from tokenzip.testing import CASES, VOCAB

from conftest import ENCODER_STAGE, built, compatible

WINDOW = 80  # feature frames of one window of the tiny config
AUDIO_METHODS = [pytest.param(m, id=m.info.name) for m in [*tz.METHODS, *ENCODER_STAGE]
                 if compatible(m, CASES["whisper"])]
# at retain 1 every method keeps every frame (the gate returns them as they are): one per kind of path suffices
RETAIN_ONE = [p for p in AUDIO_METHODS if p.id in ("avgpool", "vad_prune", "omnizip", "atome@encoder1")]
LENGTHS = (130, 200, 95)  # feature frames of three recordings: 2, 3 and 2 windows


def _recording(frames: int, seed: int) -> torch.Tensor:
    """Log-mel-like features ``[16, frames]`` with a quiet stretch in every window (speech and silence)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(16, frames, generator=g) * 0.3 + 0.5
    for start in range(0, frames, WINDOW):
        f[:, start + 50: start + 65] = -0.5
    return f


def _batch(lengths=LENGTHS, seeds=(1, 2, 3)):
    """Recordings padded (with zeros) to the longest, and the attention mask long-form needs for a batch."""
    longest = max(lengths)
    feats = torch.zeros(len(lengths), 16, longest)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for i, (n, s) in enumerate(zip(lengths, seeds)):
        feats[i, :, :n] = _recording(n, s)
        mask[i, :n] = 1
    return {"input_features": feats, "attention_mask": mask}


def _generate(model, inputs, **kw):
    """Long-form generate(); timestamps above 0.4 s are suppressed, so that the random model's last timestamp moves
    each recording's seek by less than a window: 6 rounds of 3, 3, 3, 2, 1, 1 windows for ``_batch()``."""
    out = model.generate(**inputs, return_timestamps=True, max_new_tokens=8, do_sample=False,
                         condition_on_prev_tokens=False, suppress_tokens=list(range(25, VOCAB)), **kw)
    return out if isinstance(out, torch.Tensor) else out["sequences"]


def _encoder_outputs(model):
    """What the decoder gets from the encoder at each of generate()'s calls (keyword ``input_features``; the
    adapter's own encoder pass on a window, positional, is left out): (features, hidden) pairs."""
    seen = []

    def hook(m, args, kwargs, out):
        if "input_features" in kwargs:
            seen.append((kwargs["input_features"], out.last_hidden_state))

    return seen, model.model.encoder.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("method", RETAIN_ONE)
def test_long_form_at_retain_one_equals_stock_long_form(method):
    model = built("whisper")
    inputs = _batch()
    seen, h = _encoder_outputs(model)
    try:
        ref = _generate(model, inputs)
        stock_windows = sum(f.shape[0] for f, _ in seen)
        c = method(retain=1.0)
        with c(model):
            out = _generate(model, inputs)
    finally:
        h.remove()
    assert torch.equal(out, ref)
    # every window row the stock long-form encoded went through the method once (last_stats: one per window row)
    assert stock_windows == 13 and len(c.last_stats) == stock_windows
    assert all(s["audio"].tokens_in == s["audio"].tokens_out == 40 for s in c.last_stats)


@pytest.mark.parametrize("method", AUDIO_METHODS)
def test_long_form_batch_of_different_lengths_equals_singles(method):
    model = built("whisper")
    c = method(retain=0.25)
    seen, h = _encoder_outputs(model)
    try:
        with c(model):
            batch = _generate(model, _batch())
            batch_windows = list(seen)
            singles = []
            for n, s in zip(LENGTHS[1:], (2, 3)):  # the 3- and 2-window recordings alone (kept short: ~1 s each)
                seen.clear()
                singles.append((_generate(model, _batch((n,), (s,))), list(seen)))
    finally:
        h.remove()
    k = c.budget.count(40) if hasattr(c, "budget") else None
    for i, (one, windows) in enumerate(singles, start=1):
        ref = batch[i][batch[i] != model.generation_config.pad_token_id]
        assert torch.equal(one[0][one[0] != model.generation_config.pad_token_id], ref), i
        assert windows, "the single recording was never encoded"
        for feats, hidden in windows:  # every window the decoder read was compressed ...
            assert hidden.shape[1] == (k or hidden.shape[1]) < 40
            # ... and is the same compressed window the batch gave that recording
            match = [bh[j] for bf, bh in batch_windows for j in range(bf.shape[0]) if torch.equal(bf[j], feats[0])]
            assert match, "a window of the single run was not encoded in the batch"
            torch.testing.assert_close(hidden[0], match[0], atol=1e-5, rtol=1e-5)


def test_long_form_reads_compressed_windows_and_keeps_the_fallback():
    """Every decoder pass of a long-form call reads the window's kept frames (with the proportional-attention bias
    of merged ones); the temperature fallback re-runs generate() on the same windows and gets the same ones."""
    model = built("whisper")
    lengths, handles = [], []
    for layer in model.model.decoder.layers:
        handles.append(layer.encoder_attn.register_forward_pre_hook(
            lambda m, a, kw: lengths.append(kw["key_value_states"].shape[1]), with_kwargs=True))
    calls = []
    handles.append(model.model.encoder.register_forward_hook(lambda m, a, out: calls.append(out.last_hidden_state)))
    c = tz.get("avgpool", retain=0.25)
    try:
        torch.manual_seed(0)
        with c(model):
            out = _generate(model, _batch(), temperature=(0.0, 0.5), compression_ratio_threshold=1.0,
                            logprob_threshold=0.0)
    finally:
        for h in handles:
            h.remove()
    assert out.shape[0] == 3 and lengths and set(lengths) == {10}
    assert len(calls) > len(c.last_stats)  # the fallback re-encoded windows: the compressed ones were reused
    assert all(s["audio"].tokens_out == 10 for s in c.last_stats)
    assert "forward" not in vars(model.model.encoder)  # the substitution is gone with the patch


def test_short_features_stay_an_error():
    model = built("whisper")
    with tz.get("vad_prune", retain=0.5)(model):
        with pytest.raises(ValueError, match="80-frame"):
            model(input_features=torch.zeros(1, 16, 60), decoder_input_ids=torch.tensor([[3]]))
        with pytest.raises(ValueError, match="length 80"):  # long-form is generate()'s; forward() is Whisper's error
            model(input_features=torch.zeros(1, 16, 160), decoder_input_ids=torch.tensor([[3]]))
        with pytest.raises(ValueError, match="raw_audio must hold one 16 kHz mono waveform per recording"):
            _generate(model, _batch(), raw_audio=[torch.zeros(160)])


def test_long_form_raw_audio_gives_each_window_its_slice_of_silero(monkeypatch):
    """With raw_audio, each window's speech signal is the slice of its recording's Silero probabilities that the
    window covers (found here independently, by brute force over the recording's feature frames)."""
    from tokenzip.adapters.speech import silero_speech
    from tokenzip.methods.vad_prune import VadPrune

    if silero_speech(torch.zeros(16000).numpy(), 4) is None:
        pytest.skip("silero-vad is not installed (make venv installs it); the energy fallback is used then")
    inputs = _batch()
    g = torch.Generator().manual_seed(5)
    waves = []
    for n in LENGTHS:  # 160 samples per feature frame: noise with a quiet second half
        w = torch.randn(n * 160, generator=g) * 0.3
        w[n * 80:] *= 0.001
        waves.append(w.numpy())
    speech_seen = []
    original = VadPrune._compress

    def spy(self, tokens, k, layout, signals):
        speech_seen.append(signals["speech"][0].clone())
        return original(self, tokens, k, layout, signals)

    monkeypatch.setattr(VadPrune, "_compress", spy)
    model = built("whisper")
    seen, h = _encoder_outputs(model)
    try:
        with tz.get("vad_prune", retain=0.5)(model):
            _generate(model, inputs, raw_audio=waves)
    finally:
        h.remove()
    rows = [f[j] for f, _ in seen for j in range(f.shape[0])]
    assert len(rows) == len(speech_seen) == 13
    full = [silero_speech(w, 200) for w in waves]  # 200 encoder frames cover every recording
    for row, speech in zip(rows, speech_seen):
        feats = inputs["input_features"]
        where = [(r, s) for r, n in enumerate(LENGTHS) for s in range(n)
                 if torch.equal(feats[r, :, s: s + min(WINDOW, n - s)], row[:, : min(WINDOW, n - s)])]
        r, s = where[0]
        expect = full[r][s // 2: s // 2 + 40]
        expect = torch.cat([expect, expect.new_zeros(40 - expect.shape[0])])
        torch.testing.assert_close(speech.float(), expect.float(), atol=0, rtol=0)


def test_longform_bench_recording_and_table():
    """The long-form benchmark's recording: LibriVox clips concatenated in shuffled rounds, and its table."""
    import os

    from tokenzip import data
    from tokenzip.bench.longform import SAMPLING_RATE, long_recording, markdown

    if not data.has_librivox():
        hint = f"Debian package {data.LIBRIVOX_PACKAGE} is not installed (make venv installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(hint)
        pytest.skip(hint)
    wave, ref = long_recording(40, seed=1)
    assert wave.shape[0] >= 40 * SAMPLING_RATE and wave.dtype.name == "float32"
    again, ref2 = long_recording(40, seed=1)
    assert ref == ref2 and wave.shape == again.shape  # seeded
    assert long_recording(40, seed=2)[1] != ref  # another order
    with pytest.raises(ValueError, match="seconds"):
        long_recording(0)
    row = {"audio_s": 40.2, "method": "vad_prune", "retain": 0.25, "wer": 0.05, "generate_s": 1.0,
           "peak_mem_bytes": 2**20, "tokens_per_window": [375]}
    assert "| 40.2 | vad_prune | 0.25 | 375 | 5.0% | 1.0 | 1 | 0 |" in markdown([row])
