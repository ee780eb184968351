"""Public API contract and clear errors for bad input."""

import pytest
import torch

import tokenzip as tz
from tokenzip.testing import CASES, Sample, default_samples

from conftest import built


def test_methods_list_has_required_fields():
    infos = tz.methods()
    assert infos and all(isinstance(i, tz.MethodInfo) for i in infos)
    for i in infos:
        assert i.family in ("baseline", "input", "transformation", "similarity", "attention", "query")
        assert i.stage in ("input", "encoder", "pre_llm", "llm")
        assert set(i.modalities) <= {"image", "video", "audio"} and i.modalities
        assert isinstance(i.query_aware, bool) and i.reference
    assert len({i.name for i in infos}) == len(infos)


def test_get_and_classes_agree():
    for info in tz.methods():
        a = tz.get(info.name, retain=0.5)
        assert type(a) is tz.method_class(info.name)
        assert getattr(tz, type(a).__name__) is type(a)


@pytest.mark.parametrize("kwargs,exc,words", [
    ({"retain": 0.0}, ValueError, "retain"),
    ({"retain": -0.1}, ValueError, "retain"),
    ({"retain": 1.5}, ValueError, "retain"),
    ({"retain": float("nan")}, ValueError, "retain"),
    ({"tokens": 0}, ValueError, "tokens"),
    ({"tokens": 2.5}, TypeError, "tokens"),
    ({"retain": "half"}, TypeError, "retain"),
    ({"retain": 0.5, "tokens": 3}, ValueError, "exactly one"),
    ({}, ValueError, "exactly one"),
])
def test_bad_budgets(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        tz.get("random", **kwargs)


def test_budget_rounding():
    b = tz.Budget(retain=0.25)
    assert b.count(576) == 144 and b.count(1) == 1 and b.count(3) == 1  # round half up, at least 1
    assert tz.Budget(retain=0.5).count(5) == 3
    assert tz.Budget(tokens=64).count(10) == 10 and tz.Budget(tokens=64).count(100) == 64


def test_unknown_method_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean avgpool"):
        tz.get("avgpol", retain=0.5)


def test_unsupported_model_is_a_type_error_naming_supported_classes():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        with tz.get("random", retain=0.5)(model):
            pass
    assert "forward" not in model.__dict__


# audio adapters have their own clip/prompt mismatch tests (tests/test_audio.py, tests/test_qwen2_audio.py)
@pytest.mark.parametrize("case", [c for c in CASES if "image" in CASES[c].modalities])
def test_image_count_mismatch_is_a_clear_error(case):
    model = built(case)
    inputs = CASES[case].make_inputs(model, [Sample([1, 5], 1, [6], seed=1)])
    ids = inputs["input_ids"]
    # drop one placeholder token: the prompt no longer matches the image
    token = model.config.image_token_id
    pos = (ids[0] == token).nonzero()[0, 0]
    inputs["input_ids"] = torch.cat([ids[:, :pos], ids[:, pos + 1:]], dim=1)
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            inputs[key] = torch.cat([inputs[key][:, :pos], inputs[key][:, pos + 1:]], dim=1)
    with tz.get("random", retain=0.5)(model):
        with pytest.raises(ValueError, match="do not match the prompt"):
            model(**inputs)
    assert "forward" not in model.__dict__


def test_compress_tensor_level():
    x = torch.randn(2, 16, 8)
    out = tz.get("avgpool", tokens=4).compress(x)
    assert out.tokens.shape == (2, 4, 8) and out.source.shape == (2, 16) and out.index.shape == (2, 4)
    torch.testing.assert_close(out.tokens[0, 0], x[0].view(4, 4, 8)[:2, :2].reshape(4, 8).mean(0))
    with pytest.raises(TypeError, match="tokens"):
        tz.get("avgpool", tokens=4).compress(torch.randn(16, 8))
    with pytest.raises(ValueError, match="grid"):
        tz.get("avgpool", tokens=4).compress(x, grid=(3, 3))


def test_nested_patch_is_refused_and_apply_handle_removes():
    model = built("llava")
    h = tz.get("random", retain=0.5).apply(model)
    try:
        with pytest.raises(RuntimeError, match="already compressed"):
            tz.get("avgpool", retain=0.5).apply(model)
    finally:
        h.remove()
    assert "forward" not in model.__dict__


def test_last_stats_per_sample_per_modality():
    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, default_samples())
    c = tz.get("avgpool", retain=0.25)
    with c(model), torch.no_grad():
        model(**inputs)
    assert len(c.last_stats) == 3
    s1 = c.last_stats[1]["image"]
    assert len(s1.items) == 2 and s1.tokens_in == 32 and s1.tokens_out == 8
    assert s1.kept[0].shape == (4,)


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_parts_are_the_models_own_modules(case):
    """The adapter is the one source of model structure: every part it names is a submodule of the model."""
    from tokenzip.adapters import adapter_for

    model = built(case)
    parts = adapter_for(model).parts()
    own = {id(m) for m in model.modules()}
    for name in ("encoder", "encoder_layers", "language_model", "decoder_layers", "final_norm", "embed"):
        assert id(getattr(parts, name)) in own, name
    assert parts.projector is None or id(parts.projector) in own
    assert len(parts.encoder_layers) >= 1 and len(parts.decoder_layers) >= 1
    assert all(id(layer) in {id(m) for m in parts.language_model.modules()} for layer in parts.decoder_layers)
    ids = set(parts.media_token_ids.values())
    assert all(isinstance(v, int) for v in ids)


def test_last_stats_reflect_the_latest_call():
    """A call without media leaves no stale stats of the previous call behind; generate() keeps its prefill's."""
    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, default_samples())
    c = tz.get("avgpool", retain=0.5)
    with c(model), torch.no_grad():
        model(**inputs)
        assert len(c.last_stats) == 3
        text_only = {"input_ids": torch.tensor([[1, 5, 6]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
        model(**text_only)
        assert c.last_stats == []
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert len(c.last_stats) == 3 and c.last_stats[0]["image"].tokens_out > 0
