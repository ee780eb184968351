"""tokenzip bench: metrics from a fake clock, the oracle path, FLOP formula, torchrun == one process.

No timing assertions: every time below comes from an injected fake clock."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from tokenzip import timing
from tokenzip.base import MethodInfo
from tokenzip.bench import TIMING_FIELDS, BenchConfig, build, run_bench
from tokenzip.bench.instrument import Clock
from tokenzip.bench.measure import call
from tokenzip.methods.random_prune import RandomPrune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# fake seconds: encoder pass, signal probe, compression, projector call, LLM per input token
ENC, SIG, COMP, PROJ, PER_TOKEN = 3.0, 0.25, 0.5, 0.0625, 0.01


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


@dataclass
class SlowScored(RandomPrune):
    """Random selection that asks for an attention signal and takes COMP fake seconds."""

    info: ClassVar[MethodInfo] = MethodInfo(name="slow_scored", family="input", modalities=("image",),
                                            stage="pre_llm", query_aware=False, reference="test double")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)
    clock: ClassVar[FakeClock | None] = None

    def _compress(self, tokens, k, layout, signals):
        self.clock.advance(COMP)
        return super()._compress(tokens, k, layout, signals)


def _slow_model(clock):
    built = build("tiny")
    tower = built.model.model.vision_tower
    lm = built.model.model.language_model
    enc_fwd, lm_fwd = tower.forward, lm.forward

    def tower_forward(*a, **kw):
        clock.advance(ENC)
        return enc_fwd(*a, **kw)

    def lm_forward(*a, **kw):
        x = kw.get("inputs_embeds")
        clock.advance(PER_TOKEN * x.shape[1])
        return lm_forward_orig(*a, **kw)

    lm_forward_orig = lm_fwd
    tower.forward = tower_forward
    lm.forward = lm_forward
    proj = built.model.model.multi_modal_projector
    proj_fwd = proj.forward

    def proj_forward(*a, **kw):
        clock.advance(PROJ)
        return proj_fwd(*a, **kw)

    proj.forward = proj_forward
    return built


def _tiny_llm_flops(n):
    # tokenzip.testing.tiny_llava: 3 Llama layers, width 32, 4 heads x 8, 2 KV heads, MLP 64, vocab 128
    p = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64
    return 3 * (2 * p * n + 2 * n * (n + 1) * 32) + 2 * 32 * 128


def test_metrics_from_fake_clock(tmp_path, monkeypatch):
    clock = FakeClock()
    SlowScored.clock = clock
    bench_recording = timing.recording

    def slow_signal_spans(start):
        """The bench's own recorder, with SIG fake seconds of work inside every "signals" span (the adapter's
        attention probe marks its work with timing.span("signals"))."""
        def start_slow(kind):
            stop = start(kind)
            if kind == "signals":
                clock.advance(SIG)
            return stop
        return bench_recording(start_slow)

    monkeypatch.setattr(timing, "recording", slow_signal_spans)
    built = _slow_model(clock)
    text = int((built.inputs["input_ids"] != 100).sum())
    n_img = int((built.inputs["input_ids"] == 100).sum())
    cfg = BenchConfig(model="tiny", methods=[SlowScored], retain=[0.5, 0.25], out=str(tmp_path), repeats=2,
                      warmup=1, new_tokens=3, quality="none", progress=False, clock=clock)
    res = run_bench(cfg, built=built)
    rows = {(r["kind"], r["retain"]): r for r in res["rows"]}
    none = rows[("none", 1.0)]
    full_len = text + n_img
    assert none["encoder_s"] == pytest.approx(ENC)
    assert none["compress_s"] == 0
    assert none["prefill_s"] == pytest.approx(PER_TOKEN * full_len)
    assert none["ttft_s"] == pytest.approx(ENC + PROJ + PER_TOKEN * full_len)
    assert none["other_s"] == pytest.approx(PROJ)  # the stock path's projector
    assert none["decode_s_per_token"] == pytest.approx(PER_TOKEN)
    assert none["speedup"] == pytest.approx(1.0)
    assert none["llm_flops"] == pytest.approx(_tiny_llm_flops(full_len))
    p = none["prefill_s"] / none["ttft_s"]
    for r in (0.5, 0.25):
        k = max(1, int(r * n_img + 0.5))
        m, o = rows[("method", r)], rows[("oracle", r)]
        assert (m["tokens_in"], m["tokens_out"]) == (n_img, k)
        assert m["llm_seq_len"] == o["llm_seq_len"] == text + k
        assert m["encoder_s"] == pytest.approx(ENC)  # the signal probe is not encoder time ...
        assert m["compress_s"] == pytest.approx(SIG + COMP)  # ... it is compression time (the projector is not)
        assert m["prefill_s"] == pytest.approx(PER_TOKEN * (text + k))
        assert m["other_s"] == pytest.approx(PROJ)
        assert m["ttft_s"] == pytest.approx(ENC + SIG + COMP + PROJ + PER_TOKEN * (text + k))
        assert m["decode_s_per_token"] == pytest.approx(PER_TOKEN)
        assert o["compress_s"] == 0 and o["encoder_s"] == pytest.approx(ENC)
        assert o["ttft_s"] == pytest.approx(ENC + PROJ + PER_TOKEN * (text + k))
        assert o["prefill_s"] == pytest.approx(PER_TOKEN * (text + k))
        assert m["overhead_vs_oracle"] == pytest.approx(m["ttft_s"] / o["ttft_s"])
        # every repeat takes the same fake time: the paired per-repeat estimate equals the ratio of medians
        assert m["overhead_vs_oracle_paired"] == pytest.approx(m["overhead_vs_oracle"])
        assert m["oracle_speedup"] == pytest.approx(none["ttft_s"] / o["ttft_s"])
        assert m["llm_flops"] == pytest.approx(_tiny_llm_flops(text + k))
        assert m["encoder_flops"] == none["encoder_flops"] > 0
        s = _tiny_llm_flops(full_len) / _tiny_llm_flops(text + k)
        assert m["llm_flop_speedup"] == pytest.approx(s)
        assert m["flop_speedup"] == pytest.approx(none["flops"] / m["flops"])
        assert m["amdahl_bound"] == pytest.approx(1 / ((1 - p) + p / s))
    for row in res["rows"]:
        for key in ("method", "retain", "ttft_s", "encoder_s", "compress_s", "prefill_s", "decode_s_per_token",
                    "peak_mem_bytes", "tokens_in", "tokens_out", "flops", "overhead_vs_oracle", "speedup"):
            assert key in row
        assert {"torch", "transformers", "device", "threads", "dtype", "attn_implementation"} <= set(row["env"])
    assert (tmp_path / "results.jsonl").exists() and (tmp_path / "report.md").exists()
    assert (tmp_path / "speedup_vs_retain.png").exists()
    assert "overhead vs oracle" in (tmp_path / "report.md").read_text()


def test_oracle_feeds_exactly_the_kept_tokens():
    built = build("tiny")
    model, inputs = built.model, built.inputs
    comp = RandomPrune(retain=0.25, seed=3)
    tm = call(model, inputs, clock=Clock(), new_tokens=1, compressor=comp, capture=True, record=True)
    to = call(model, tm.captured, clock=Clock(), new_tokens=1, record=True)
    assert "pixel_values" not in tm.captured and "mm_encoder_outputs" in tm.captured
    assert len(to.encoder_passes) == 0  # the oracle does not run the encoder (its TTFT adds it separately)
    m_emb, o_emb = tm.llm_calls[0]["inputs_embeds"], to.llm_calls[0]["inputs_embeds"]
    assert torch.equal(m_emb, o_emb)
    # independently: the image positions hold the stock model's projected features at the kept indices
    kept = comp.last_stats[0]["image"].items[0].index
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)
    feats = feats[0] if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
    ids = tm.captured["input_ids"][0]
    img_pos = (ids == model.config.image_token_id).nonzero().flatten()
    assert len(img_pos) == comp.budget.count(feats.shape[0]) == len(kept)
    torch.testing.assert_close(o_emb[0, img_pos], feats[kept], rtol=1e-5, atol=1e-5)
    text_pos = (ids != model.config.image_token_id).nonzero().flatten()
    emb = model.get_input_embeddings()(ids[text_pos])
    torch.testing.assert_close(o_emb[0, text_pos], emb)
    # and the uncompressed call feeds every token
    tn = call(model, inputs, clock=Clock(), new_tokens=1, record=True)
    assert tn.llm_calls[0]["length"] == inputs["input_ids"].shape[1]


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="retain"):
        BenchConfig(retain=[0.0]).validate()
    with pytest.raises(ValueError, match="repeats"):
        BenchConfig(repeats=0).validate()
    with pytest.raises(ValueError, match="preset"):
        build("no-such-preset")


def _rows(path):
    with open(os.path.join(path, "results.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k not in TIMING_FIELDS and k not in ("env",)}
        out.append(r)
    return out


def test_torchrun_two_processes_equal_one(tmp_path):
    args = ["--model", "tiny", "--methods", "random,avgpool", "--retain", "0.5,0.25", "--repeats", "1",
            "--warmup", "0", "--new-tokens", "2", "--quality", "none", "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "tokenzip.bench", *args, "--out", str(one)], check=True, cwd=ROOT,
                   env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tokenzip.bench", *args, "--out", str(two)], check=True, cwd=ROOT, env=env, timeout=300)
    r1, r2 = _rows(one), _rows(two)
    assert len(r1) == 1 + 2 * 2 * 2
    assert r1 == r2
    with open(two / "results.jsonl") as f:
        full = [json.loads(line) for line in f]
    assert {r["measured_on_rank"] for r in full} == {0, 1}
    assert all(r["env"]["world_size"] == 2 for r in full)
    for name in ("report.md", "speedup_vs_retain.png"):
        assert (two / name).exists()


def test_fidelity_pipeline_on_a_tiny_encoder():
    """The DINOv2 fidelity path end to end on a random tiny Dinov2 (the real weights are exercised by the bench)."""
    import numpy as np
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    from tokenzip.bench.fidelity import fidelity_metrics, run_fidelity

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, image_size=56, patch_size=14)).eval()
    proc = BitImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    rng = np.random.default_rng(0)
    images = [(f"noise{i}", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(4)]
    rows = run_fidelity(["random", "visionzip", "trim"], [1.0, 0.5], model=model, processor=proc, images=images)
    done = {(r["method"], r["retain"]): r for r in rows if "skipped" not in r}
    assert done[("random", 1.0)]["cosine"] == pytest.approx(1.0, abs=1e-6)  # retain 1 keeps every token
    assert done[("random", 1.0)]["nn_agreement"] == 1.0 and done[("random", 1.0)]["self_retrieval"] == 1.0
    assert done[("visionzip", 0.5)]["tokens_out"] == 8 and done[("visionzip", 0.5)]["tokens_in"] == 16
    assert any(r.get("method") == "trim" and "skipped" in r for r in rows)
    # the metrics themselves
    full = torch.eye(3)
    m = fidelity_metrics(full, full.clone())
    assert m == {"cosine": pytest.approx(1.0), "cosine_min": pytest.approx(1.0), "nn_agreement": 1.0,
                 "self_retrieval": 1.0}
    m = fidelity_metrics(full, full[[1, 0, 2]])
    assert m["self_retrieval"] == pytest.approx(1 / 3) and m["cosine_min"] == pytest.approx(0.0)


def test_local_checkpoint_directory(tmp_path):
    """``--model PATH``: any local HF checkpoint folder (no processor here: inputs are built from its config)."""
    tiny = build("tiny")
    tiny.model.save_pretrained(tmp_path / "ckpt")
    built = build(str(tmp_path / "ckpt"))
    assert type(built.model).__name__ == "LlavaForConditionalGeneration"
    assert int((built.inputs["input_ids"] == tiny.model.config.image_token_id).sum()) == 16
    res = run_bench(BenchConfig(model=str(tmp_path / "ckpt"), methods=["random"], retain=[0.5], repeats=1,
                                warmup=0, new_tokens=2, quality="none", progress=False, out=str(tmp_path / "out")),
                    built=built)
    kinds = [(r["kind"], r["method"], r["tokens_out"]) for r in res["rows"]]
    assert kinds == [("none", "none", 16), ("method", "random", 8), ("oracle", "random", 8)]


@pytest.mark.parametrize("case", [c for c, v in __import__("tokenzip.testing", fromlist=["CASES"]).CASES.items()
                                  if "image" in v.modalities])
def test_oracle_matches_method_inputs_for_every_image_case(case):
    """For every registered image adapter, the oracle call's LLM gets the very inputs the method's call got."""
    preset = "tiny" if case == "llava" else f"tiny-{case}"
    built = build(preset)
    comp = RandomPrune(retain=0.5)
    tm = call(built.model, built.inputs, clock=Clock(), new_tokens=1, compressor=comp, capture=True, record=True)
    to = call(built.model, tm.captured, clock=Clock(), new_tokens=1, record=True)
    assert not to.encoder_passes
    m_emb, o_emb = tm.llm_calls[0]["inputs_embeds"], to.llm_calls[0]["inputs_embeds"]
    assert m_emb.shape == o_emb.shape and m_emb.shape[1] < built.inputs["input_ids"].shape[1]
    torch.testing.assert_close(m_emb, o_emb, rtol=0, atol=0)


@dataclass
class KeepsAll(RandomPrune):
    """A method that, whatever its budget, hands back every token (e.g. a schedule that never prunes)."""

    info: ClassVar[MethodInfo] = MethodInfo(name="keeps_all", family="input", modalities=("image",),
                                            stage="pre_llm", query_aware=False, reference="test double")

    def compress(self, tokens, *, grid=None, k=None, **signals):
        return super().compress(tokens, grid=grid, k=tokens.shape[1], **signals)


@dataclass
class VideoOnly(RandomPrune):
    info: ClassVar[MethodInfo] = MethodInfo(name="video_only", family="input", modalities=("video",),
                                            stage="pre_llm", query_aware=False, reference="test double")


def test_points_that_compress_nothing_are_skipped_not_method_rows(tmp_path):
    res = run_bench(BenchConfig(model="tiny", methods=[KeepsAll, VideoOnly, RandomPrune], retain=[0.5], repeats=1,
                                warmup=0, new_tokens=1, quality="none", progress=False, out=str(tmp_path)))
    kinds = [(r["kind"], r["method"]) for r in res["rows"]]
    assert kinds == [("none", "none"), ("method", "random"), ("oracle", "random")]
    assert "nothing was compressed" in res["skipped"]["keeps_all"]
    assert "modalities ['video']" in res["skipped"]["video_only"]
    report = (tmp_path / "report.md").read_text()
    table = report.split("## Measured")[1].split("![speed-up")[0]
    assert "| random" in table and "keeps_all" not in table and "video_only" not in table
    assert "`keeps_all`: skipped at retain 0.5: kept every image token (16)" in report


def test_stage_modules_come_from_the_adapter(monkeypatch):
    """A model that keeps its parts under another attribute (here ``thinker``) is timed and counted through its
    adapter alone: nothing in the bench or the CLI guesses attribute paths."""
    from tokenzip import adapters
    from tokenzip.adapters.base import Adapter, ModelParts
    from tokenzip.adapters.vision import encoder_layers
    from tokenzip.bench.first_token import language_model
    from tokenzip.bench.instrument import find_roles
    from tokenzip.bench.presets import _count_layers
    from tokenzip.testing import tiny_llava

    class ThinkerModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.thinker = tiny_llava()

    class ThinkerAdapter(Adapter):
        model_classes = ("ThinkerModel",)

        def parts(self):
            core = self.model.thinker.model
            return ModelParts(encoder=core.vision_tower, encoder_layers=encoder_layers(core.vision_tower),
                              projector=core.multi_modal_projector, language_model=core.language_model,
                              decoder_layers=core.language_model.layers, final_norm=core.language_model.norm,
                              embed=core.get_input_embeddings(), media_token_ids={"image": 100})

        has_media = batch_size = encode = rebuild = None

    monkeypatch.setattr(adapters, "ADAPTERS", [ThinkerAdapter, *adapters.ADAPTERS])
    model = ThinkerModel()
    core = model.thinker.model
    roles = find_roles(model)
    assert roles.encoder is core.vision_tower and roles.llm is core.language_model
    assert roles.projector is core.multi_modal_projector and roles.llm_layers is core.language_model.layers
    assert _count_layers(model) == {"vision": len(encoder_layers(core.vision_tower)),
                                    "text": len(core.language_model.layers)}
    assert language_model(model) is core.language_model
    assert find_roles(torch.nn.Linear(2, 2)).llm is None  # no adapter: nothing is guessed


def test_projector_inside_the_encoder_is_encoder_time():
    """Qwen2-VL's patch merger is its projector and part of its vision tower: not timed twice."""
    from tokenzip.bench.instrument import find_roles

    built = build("tiny-qwen2_vl")
    roles = find_roles(built.model)
    assert roles.encoder is built.model.model.visual and roles.projector is None


# ---- encoder-stage rows (tz.InEncoder): specs, replay oracle, time split, encoder FLOPs ----------------------------
def test_method_specs_parse_in_one_place():
    import tokenzip as tz
    from tokenzip.bench.specs import MethodSpec, make_method, parse_spec, resolve

    assert parse_spec("tome") == ("tome", None)
    assert parse_spec("tome@encoder6") == ("tome", 6)
    assert parse_spec("tome@encoder1+2+3") == ("tome", (1, 2, 3))
    for bad in ("tome@decoder1", "tome@encoder", "tome@encoder1+", "@encoder2", "tome@encoderx"):
        with pytest.raises(ValueError, match="NAME@encoderL"):
            parse_spec(bad)
    c = make_method("tome@encoder1+2", 0.25)
    assert isinstance(c, tz.InEncoder) and c.layer == (1, 2) and c.budget.retain == 0.25
    spec = resolve("visionzip@encoder2")
    assert isinstance(spec, MethodSpec) and spec.info.stage == "encoder" and spec.info.name == "visionzip@encoder2"
    assert isinstance(spec(retain=0.1), tz.InEncoder)
    assert resolve("tome") is tz.ToMe
    with pytest.raises(TypeError, match="NAME@encoderL"):
        resolve(3)
    # NAME@llmK: an LLM-stage method's decoder layer
    assert parse_spec("fastv@llm4") == ("fastv", None)
    assert make_method("fastv@llm4", 0.25).layer == 4
    llm = resolve("fastv@llm4")
    assert llm.info.name == "fastv@llm4" and llm.info.stage == "llm" and llm(retain=0.1).layer == 4
    for bad in ("fastv@llm", "fastv@llm0", "fastv@llmx", "@llm3"):
        with pytest.raises(ValueError, match="NAME@llmK"):
            make_method(bad, 0.25)
    with pytest.raises(ValueError, match="no|none"):
        make_method("tome@llm2", 0.25)  # not an LLM-stage method


@dataclass
class EncoderStageDouble(RandomPrune):
    """A registered-style stage-"encoder" method (the adapter must not skip it); never run here."""

    info: ClassVar[MethodInfo] = MethodInfo(name="encoder_double", family="input", modalities=("image",),
                                            stage="encoder", query_aware=False, reference="test double")


def test_resolve_methods_keeps_encoder_stage():
    from tokenzip.bench.specs import MethodSpec
    from tokenzip.bench.sweep import resolve_methods

    built = build("tiny")
    run, skipped = resolve_methods(built.model, ["tome@encoder1", EncoderStageDouble, "random"])
    assert [n for n, _ in run] == ["tome@encoder1", "encoder_double", "random"] and not skipped
    assert isinstance(run[0][1], MethodSpec)
    # an adapter without stage "encoder" skips them with the reason
    q = build("tiny-qwen2_vl")
    from tokenzip.adapters import adapter_for

    if "encoder" not in adapter_for(q.model).stages:
        _, skipped = resolve_methods(q.model, ["tome@encoder1"])
        assert "stage encoder not supported" in skipped["tome@encoder1"]


def test_replay_oracle_feeds_the_methods_llm_inputs():
    """The replay oracle runs the same encoder stage with the method's recorded outputs: same LLM inputs, no signals
    asked for, the same reduced encoder passes."""
    import tokenzip as tz
    from tokenzip.bench.replay import Replay, recording

    built = build("tiny")
    model, inputs = built.model, built.inputs
    comp = tz.InEncoder(tz.get("visionzip", retain=0.25), layer=1)
    with recording(comp) as rec:
        tm = call(model, inputs, clock=Clock(), new_tokens=1, compressor=comp, capture=True, record=True)
    assert "compress" not in vars(comp) and len(rec.final) == 1 and rec.steps == []
    replay = Replay(comp, rec)
    assert replay.signals_needed() == frozenset() and replay.info.stage == "encoder" and replay.layer == 1
    to = call(model, inputs, clock=Clock(), new_tokens=1, compressor=replay, record=True)
    m_emb, o_emb = tm.llm_calls[0]["inputs_embeds"], to.llm_calls[0]["inputs_embeds"]
    assert m_emb.shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(m_emb, o_emb, rtol=0, atol=0)
    # tiny CLIP: 3 layers, features from layer -2 -> layers 0 and 1 run; [CLS] + 16 patches, then [CLS] + 4
    assert tm.encoder_layer_calls == to.encoder_layer_calls == [(0, [17]), (1, [5])]
    assert [s.index.tolist() for s in replay.last_stats[0]["image"].items] == \
        [s.index.tolist() for s in comp.last_stats[0]["image"].items]
    with pytest.raises(RuntimeError, match="more items"):  # a replay is one call's outputs, not a method
        call(model, inputs, clock=Clock(), new_tokens=1, compressor=replay)
    with pytest.raises(TypeError, match="encoder-stage"):
        Replay(tz.get("visionzip", retain=0.25), rec)


LAYER_PER_TOKEN = 0.125


def test_encoder_stage_split_and_flops_from_fake_clock(tmp_path, monkeypatch):
    import tokenzip as tz
    from tokenzip.bench import flops as F
    from tokenzip.bench.specs import MethodSpec

    clock = FakeClock()
    SlowScored.clock = clock
    bench_recording = timing.recording

    def slow_signal_spans(start):
        def start_slow(kind):
            stop = start(kind)
            if kind == "signals":
                clock.advance(SIG)
            return stop
        return bench_recording(start_slow)

    monkeypatch.setattr(timing, "recording", slow_signal_spans)
    built = _slow_model(clock)
    from tokenzip.adapters import adapter_for

    layers = adapter_for(built.model).parts().encoder_layers
    for layer in layers:
        def slow(*a, _fwd=layer.forward, **kw):
            clock.advance(LAYER_PER_TOKEN * a[0].shape[1])
            return _fwd(*a, **kw)
        layer.forward = slow

    class SlowInEncoder(MethodSpec):
        def __init__(self):
            self.spec = "slow_scored@encoder1"
            self.info = self(retain=0.5).info

        def __call__(self, retain=None, tokens=None):
            return tz.InEncoder(SlowScored(retain=retain), layer=1)

    text = int((built.inputs["input_ids"] != 100).sum())
    cfg = BenchConfig(model="tiny", methods=[SlowInEncoder()], retain=[0.25], out=str(tmp_path), repeats=2,
                      warmup=0, new_tokens=2, quality="none", progress=False, clock=clock)
    res = run_bench(cfg, built=built)
    rows = {r["kind"]: r for r in res["rows"]}
    none, m, o = rows["none"], rows["method"], rows["oracle"]
    assert m["method"] == "slow_scored@encoder1" and m["stage"] == "encoder"
    assert m["oracle_kind"] == o["oracle_kind"] == "replay"
    enc = LAYER_PER_TOKEN * (17 + 5)  # layer 0 on [CLS] + 16 patches, layer 1 on [CLS] + 4 kept
    assert m["encoder_s"] == pytest.approx(enc) and o["encoder_s"] == pytest.approx(enc)
    assert m["compress_s"] == pytest.approx(SIG + COMP)  # the method's own call and its signals
    assert o["compress_s"] == pytest.approx(0.0)  # the replay computes nothing
    assert m["prefill_s"] == o["prefill_s"] == pytest.approx(PER_TOKEN * (text + 4))
    assert m["ttft_s"] - o["ttft_s"] == pytest.approx(SIG + COMP)
    assert m["overhead_vs_oracle"] == pytest.approx(m["ttft_s"] / o["ttft_s"])
    assert m["overhead_vs_oracle_paired"] == pytest.approx(m["overhead_vs_oracle"])  # replay, per repeat
    assert m["speedup"] == pytest.approx(m["baseline"]["ttft_s"] / m["ttft_s"])
    # encoder FLOPs: each layer with its own token count; the uncompressed tower runs all 3 layers on 17 tokens
    shape = F.stack_shape(layers)
    one = lambda n: 2 * shape.linear_params * n + 4 * n * n * shape.attn_width  # noqa: E731
    assert none["encoder_flops"] == pytest.approx(3 * one(17))
    assert m["encoder_flops"] == o["encoder_flops"] == pytest.approx(one(17) + one(5))
    assert m["encoder_layer_tokens"] == [[17], [5]]
    assert m["encoder_flops_saved"] == pytest.approx(3 * one(17) - one(17) - one(5))
    assert m["encoder_flops_saved_frac"] == pytest.approx(m["encoder_flops_saved"] / none["encoder_flops"])
    report = (tmp_path / "report.md").read_text()
    assert "replay" in report and "encoder GFLOPs saved" in report


def test_encoder_flops_per_layer_full_depth():
    from tokenzip.bench.flops import StackShape, encoder_flops, encoder_flops_per_layer, layer_tokens

    shape = StackShape(layers=2, linear_params=10, attn_width=4)
    one = lambda n: 2 * 10 * n + 4 * n * n * 4  # noqa: E731
    calls = [(0, [9, 9]), (1, [3, 3])]
    assert encoder_flops_per_layer(shape, calls) == 2 * one(9) + 2 * one(3)
    # published depth 5: the 3 missing layers run on the tokens after the cut
    assert encoder_flops_per_layer(shape, calls, 5) == 2 * one(9) + 2 * one(3) + 3 * 2 * one(3)
    assert encoder_flops_per_layer(shape, [(0, [9]), (1, [9])]) == encoder_flops(shape, [9])
    assert layer_tokens(calls) == [[9, 9], [3, 3]]


def _tiny_dinov2(layers=3):
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64, image_size=56, patch_size=14)).eval()
    proc = BitImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return model, proc


def test_token_level_fidelity_and_encoder_stage_rows(tmp_path):
    import numpy as np

    import tokenzip as tz
    from tokenzip.bench.fidelity import run_fidelity, token_fidelity
    from tokenzip.zoo.dinov2 import run_with_cut

    # the metric: patch 0 and 1 merged into slot 0, patch 2 kept in slot 1, patch 3 dropped
    full = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    comp = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    m = token_fidelity(full, comp, torch.tensor([0, 0, 1, -1]))
    assert m["token_cosine"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert m["token_cosine_kept"] == pytest.approx(2 / 3)
    assert m["token_cosine_nearest"] == pytest.approx((1 + 0 + 1 + (-1 / 2 ** 0.5)) / 4)
    assert m["dropped_fraction"] == pytest.approx(0.25)

    model, proc = _tiny_dinov2()
    rng = np.random.default_rng(0)
    images = [(f"noise{i}", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(4)]
    pixels = proc(images=[im for _, im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state[:, 1:]
    out, source = run_with_cut(model, pixels, tz.get("random", retain=1.0), 1)  # retain 1: the stock tower
    torch.testing.assert_close(out, ref)
    assert source.tolist() == [list(range(16))] * 4
    out, source = run_with_cut(model, pixels, tz.get("tome", retain=0.5), 2)
    assert out.shape == (4, 8, 32) and source.shape == (4, 16) and int(source.max()) == 7
    with pytest.raises(ValueError, match="layer must be"):
        run_with_cut(model, pixels, tz.get("tome", retain=0.5), 3)

    rows = run_fidelity(["random", "tome", "tome@encoder1", "visionzip@encoder2", "random@encoder7",
                         "tome@encoder1+2"], [1.0, 0.5], model=model, processor=proc, images=images)
    done = {(r["method"], r["retain"]): r for r in rows if "skipped" not in r}
    for name in ("random", "tome", "tome@encoder1", "visionzip@encoder2"):
        assert done[(name, 1.0)]["token_cosine"] == pytest.approx(1.0, abs=1e-5)  # nothing compressed
        assert done[(name, 0.5)]["tokens_out"] == 8
    assert done[("random", 0.5)]["token_cosine_kept"] == pytest.approx(1.0, abs=1e-5)  # kept tokens are exact
    assert done[("random", 0.5)]["dropped_fraction"] == pytest.approx(0.5)
    assert done[("tome", 0.5)]["dropped_fraction"] == 0.0  # a merge represents every patch
    assert done[("tome@encoder1", 0.5)]["stage"] == "encoder" and done[("tome@encoder1", 0.5)]["cut"] == 1
    assert done[("tome@encoder1", 0.5)]["base_method"] == "tome"
    skipped = {r["method"]: r["skipped"] for r in rows if "skipped" in r}
    assert "outside" in skipped["random@encoder7"] and "one cut only" in skipped["tome@encoder1+2"]
    from tokenzip.bench.report import plot_token_fidelity, quality_table

    assert plot_token_fidelity(rows, str(tmp_path / "t.png")) and (tmp_path / "t.png").stat().st_size > 0
    table = quality_table(rows)
    assert "token cosine" in table and "| tome@encoder1 | 0.50 | 16→8 |" in table


def test_kept_set_fidelity_through_the_model_every_stage():
    """run_model_fidelity: every stage's kept set (pre-LLM, an encoder schedule, inside the LLM, several stages)
    read in the tower's own feature space, on the tiny preset (its CLIP tower stands in for DINOv2 here)."""
    import numpy as np

    from tokenzip.bench.fidelity import kept_set_features, run_model_fidelity

    # the kept set by hand: patches 0 and 1 merged into slot 1, patch 2 kept in slot 0, patch 3 dropped
    full = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])
    torch.testing.assert_close(kept_set_features(full, torch.tensor([1, 1, 0, -1])),
                               torch.tensor([[2.0, 2.0], [0.5, 0.5]]))
    assert kept_set_features(full, torch.tensor([-1, -1, -1, -1])).shape == (0, 2)

    built = build("tiny")
    tower = built.model.model.vision_tower
    rng = np.random.default_rng(0)
    images = [(f"noise{i}", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(3)]
    names = ["random", "tome", "auroracap", "fastv", "mustdrop", "vtw"]
    rows = run_model_fidelity(built.model, built.processor, names, [1.0, 0.5], dino=tower, images=images)
    done = {(r["method"], r["retain"]): r for r in rows if "skipped" not in r}
    for name in ("random", "tome", "auroracap", "fastv", "mustdrop", "vtw"):
        r = done[(name, 1.0)]
        assert r["cosine"] == pytest.approx(1.0, abs=1e-5) and r["token_cosine"] == pytest.approx(1.0, abs=1e-5)
        assert r["tokens_in"] == 16 and r["tokens_out"] == 16 and r["n_images"] == 3
    for name in ("random", "tome", "auroracap", "fastv", "mustdrop"):
        assert done[(name, 0.5)]["tokens_out"] == 8
    assert done[("random", 0.5)]["dropped_fraction"] == pytest.approx(0.5)
    assert done[("fastv", 0.5)]["dropped_fraction"] == pytest.approx(0.5)  # inside the LLM: what is left after it
    assert done[("fastv", 0.5)]["token_cosine_kept"] == pytest.approx(1.0, abs=1e-5)
    # merges represent every patch, also through a schedule of encoder cuts (stats over the tower's patches)
    assert done[("tome", 0.5)]["dropped_fraction"] == 0.0 and done[("auroracap", 0.5)]["dropped_fraction"] == 0.0
    assert [(r["method"], r["retain"], r["skipped"]) for r in rows if "skipped" in r] == [
        ("vtw", 0.5, "keeps no visual token at retain 0.5 (nothing to compare)")]


def test_side_by_side_table_takes_the_method_rows_not_the_oracles():
    from tokenzip.bench.report import side_by_side_table

    common = {"method": "fastv", "retain": 0.1, "stage": "llm", "tokens_in": 256, "tokens_out": 26}
    rows = [{**common, "kind": "method", "ttft_s": 0.27, "speedup": 2.02, "oracle_speedup": 2.33},
            {**common, "kind": "oracle", "ttft_s": 0.23, "speedup": 2.33, "oracle_speedup": 2.33}]
    kept = [{"method": "fastv", "retain": 0.1, "tokens_in": 256, "tokens_out": 26, "cosine": 0.9,
             "nn_agreement": 0.5, "self_retrieval": 0.75, "token_cosine_nearest": 0.918}]
    table = side_by_side_table(rows, kept, [])
    assert "| fastv | llm | 0.10 | 256→26 | 0.270 | 2.02 | 2.33 | 0.900 | 0.50 | 0.75 | 0.918 | – |" in table
