"""tokenzip.preview.kept_items: what a method keeps, computed by the same code generate() runs."""

import pytest
import torch

import tokenzip as tz
from tokenzip.bench import build
from tokenzip.preview import kept_items


@pytest.fixture(scope="module")
def tiny():
    built = build("tiny")
    return built.model, built.inputs


@pytest.mark.parametrize("name", ["visionzip", "tome", "cls_topk", "random", "fastv"])
def test_kept_items_match_inside_the_model(tiny, name):
    """Each method keeps exactly what it keeps inside model.generate (pre-LLM and LLM-stage alike)."""
    model, inputs = tiny
    (stats,) = kept_items(tz.get(name, retain=0.3), model, inputs)
    inside = tz.get(name, retain=0.3)
    with inside(model), torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    (expected,) = inside.last_stats[0]["image"].items
    assert torch.equal(expected.source, stats.source) and torch.equal(expected.index, stats.index), name
    assert (stats.tokens_in, stats.tokens_out) == (expected.tokens_in, expected.tokens_out)
    assert not hasattr(model, "_tokenzip_patch") or model._tokenzip_patch is None  # nothing left installed


def test_many_methods_share_one_encode_and_match_one_at_a_time(tiny):
    """The demo encodes once for many methods; each must get what it gets alone (and inside model.generate)."""
    model, inputs = tiny
    names = ["visionzip", "tome", "cls_topk", "random", "fastv"]
    many = kept_items([tz.get(n, retain=0.3) for n in names], model, inputs)
    assert len(many) == len(names)
    for name, stats in zip(names, many):
        (one,) = kept_items(tz.get(name, retain=0.3), model, inputs)
        assert torch.equal(one.source, stats[0].source) and torch.equal(one.index, stats[0].index), name


def test_encoder_stage_methods_run_their_own_encoder_pass():
    """An encoder-stage method changes the encoder pass itself, so it is not given the shared one."""
    built = build("tiny-whisper")

    def methods():
        return [tz.get("avgpool", retain=0.5), tz.InEncoder(tz.get("tome", retain=0.5), layer=1)]

    many = kept_items(methods(), built.model, built.inputs)
    for one_method, stats in zip(methods(), many):
        one = kept_items(one_method, built.model, built.inputs)
        assert [(s.tokens_in, s.tokens_out) for s in one] == [(s.tokens_in, s.tokens_out) for s in stats]
        assert all(torch.equal(a.source, b.source) for a, b in zip(one, stats))
    assert many[1][0].tokens_out < many[1][0].tokens_in


def test_kept_items_bad_input(tiny):
    model, inputs = tiny
    no_media = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="inputs: the model call carries no media"):
        kept_items(tz.get("tome", retain=0.5), model, no_media)
    with pytest.raises(TypeError, match="compressor must be a tokenzip method"):
        kept_items("tome", model, inputs)
    with pytest.raises(TypeError, match="inputs must be"):
        kept_items(tz.get("tome", retain=0.5), model, [inputs])
    with pytest.raises(ValueError, match="at least one"):
        kept_items([], model, inputs)
    with pytest.raises(TypeError, match="compresses"):  # an audio method on an image model
        kept_items(tz.get("vad_prune", retain=0.5), model, inputs)


@pytest.mark.parametrize("spec", ["tome@encoder1", "visionzip@encoder1", "avgpool@encoder1"])
def test_encoder_stage_kept_items_match_inside_the_model(tiny, spec):
    """An image encoder-stage method (LLaVA, tz.InEncoder) previews the groups it forms inside model.generate, over
    the patch grid at the cut (what `tokenzip show --method NAME@encoderL` draws)."""
    from tokenzip.bench.specs import make_method

    model, inputs = tiny
    (stats,) = kept_items(make_method(spec, 0.25), model, inputs)
    inside = make_method(spec, 0.25)
    with inside(model), torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    (expected,) = inside.last_stats[0]["image"].items
    assert torch.equal(expected.source, stats.source) and torch.equal(expected.index, stats.index)
    assert (stats.tokens_in, stats.tokens_out) == (16, 4) and stats.grid.segments[0].h == 4
    assert stats.index.numel() == 4 and int(stats.source.max()) == 3
