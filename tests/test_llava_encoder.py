"""LLaVA-1.5 encoder stage (tz.InEncoder on the CLIP tower through the generic encoder runner): what the later
tower layers and the projector see, against the stock tower's own layers run on the kept tokens; schedules."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokenzip as tz
from tokenzip import ops
from tokenzip.adapters import adapter_for
from tokenzip.base import Compressor, MethodInfo
from tokenzip.encoder import schedule_counts
from tokenzip.testing import CASES, default_samples, tiny_llava

from conftest import built

CASE = "llava"


def _inputs(model):
    return CASES[CASE].make_inputs(model, default_samples())


def test_selection_inside_the_tower_equals_the_stock_layers_on_the_kept_tokens():
    model = built(CASE)
    inputs = _inputs(model)
    parts = adapter_for(model).parts()
    seen = {}
    h = parts.projector.register_forward_pre_hook(lambda m, a: seen.__setitem__("feats", a[0]))
    c = tz.InEncoder(tz.get("cls_topk", retain=0.25), layer=1)
    try:
        with c(model), torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    tower = parts.encoder
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_hidden_states=True)
        after_first = out.hidden_states[1]  # what leaves layer 0: the cut is between layers 0 and 1
        ref = []
        for i, it in enumerate(it for s in c.last_stats for it in s["image"].items):
            kept = torch.cat([after_first[i, :1], after_first[i, 1:][it.index]])[None]
            ref.append(parts.encoder_layers[1](kept, None)[0, 1:])
    assert seen["feats"].shape[1] == 4  # 16 patches, retain 0.25
    torch.testing.assert_close(seen["feats"], torch.stack(ref), atol=1e-5, rtol=1e-5)


def test_merges_inside_the_tower_get_proportional_attention_and_the_budget_holds():
    model = built(CASE)
    inputs = _inputs(model)
    layers = adapter_for(model).parts().encoder_layers
    masks, lengths = [], []

    def grab(m, args, kwargs):
        lengths.append(args[0].shape[1])
        masks.append(args[1] if len(args) > 1 else kwargs.get("attention_mask"))

    h = layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    c = tz.InEncoder(tz.get("tome", tokens=5), layer=1)
    try:
        with c(model), torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    assert lengths == [1 + 5]  # [CLS] + the budget, for every image of the batch
    assert masks[0] is not None and bool((masks[0] > 0).any())  # log(size) > 0 for merged tokens
    assert all(it.tokens_out == 5 for s in c.last_stats for it in s["image"].items)
    assert len(layers) == 3  # the third layer is after the feature layer (-2): never run, never needed


@pytest.mark.parametrize("layer,err", [((1, 2), r"\[1, 1\]"), (2, r"\[1, 1\]"),
                                       (0, "cut 0, before the first layer, is not supported"), ((1, 1), "increasing")])
def test_bad_cuts_are_clear_errors(layer, err):
    with pytest.raises(ValueError, match=err):
        tz.InEncoder(tz.get("tome", retain=0.5), layer=layer)(built(CASE))


def test_projected_is_not_available_inside_the_tower():
    with pytest.raises(TypeError, match="projected"):
        tz.InEncoder(tz.get("trim", retain=0.5), layer=1)(built(CASE))


# ---- schedules: a little at each of several cuts (ToMe/AuroraCap style), on a deeper tower ---------------------------
@pytest.fixture(scope="module")
def deep():
    """The tiny LLaVA with 5 CLIP layers: the feature layer (-2) is the 4th, so cuts 1..3 are valid."""
    return tiny_llava("sdpa", num_hidden_layers=5)


@dataclass
class Recorder(Compressor):
    """Test-only selection: keeps the ``k`` tokens with the highest ``cls_attention``, recording its choices."""

    info: ClassVar[MethodInfo] = MethodInfo(name="test-recorder", family="attention", modalities=("image",),
                                            stage="pre_llm", query_aware=False, reference="test")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)
    chosen: ClassVar[list[torch.Tensor]] = []

    def _compress(self, tokens, k, layout, signals):
        index = ops.stable_topk(signals["cls_attention"], k)
        Recorder.chosen.append(index.sort(dim=-1).values[0])
        return ops.select(tokens, index)


def test_schedule_shrinks_at_each_cut_with_sizes_carried(deep):
    inputs = _inputs(deep)
    layers = adapter_for(deep).parts().encoder_layers
    seen = {}

    def grab(i):
        def hook(m, args, kwargs):
            seen[i] = (args[0].shape[1], args[1] if len(args) > 1 else kwargs.get("attention_mask"))
        return hook

    hooks = [layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in range(1, 5)]
    c = tz.InEncoder(tz.get("tome", retain=0.25), layer=(1, 2, 3))
    try:
        with c(deep), torch.no_grad():
            deep(**inputs)
    finally:
        for h in hooks:
            h.remove()
    counts = schedule_counts(16, 4, 3)
    assert [seen[i][0] for i in (1, 2, 3)] == [1 + n for n in counts]  # [CLS] + the patches after each cut
    assert 4 not in seen  # after the feature layer: never run
    for i in (1, 2, 3):
        sizes = seen[i][1].exp()[:, 0, 0]
        assert torch.allclose(sizes.sum(-1), torch.full((sizes.shape[0],), 17.0))  # ToMe merges: sizes add up
        assert torch.equal(sizes[:, 0], torch.ones(sizes.shape[0]))  # [CLS] stands for itself
    assert all(it.tokens_in == 16 and it.tokens_out == 4 for s in c.last_stats for it in s["image"].items)
    for it in (it for s in c.last_stats for it in s["image"].items):  # stats over the tower's 16 patches
        assert it.source.shape == (16,) and sorted(set(it.source.tolist())) == [0, 1, 2, 3]  # merges: none dropped
        assert list(it.grid) == [(4, 4)] and it.index.shape == (4,)
        assert torch.equal(it.source[it.index], torch.arange(4))  # each output's representative is one of its own


def test_schedule_selection_equals_the_stock_layers_on_the_kept_tokens(deep):
    inputs = _inputs(deep)
    parts = adapter_for(deep).parts()
    seen = {}
    h = parts.projector.register_forward_pre_hook(lambda m, a: seen.__setitem__("feats", a[0]))
    Recorder.chosen.clear()
    c = tz.InEncoder(Recorder(retain=0.25), layer=(1, 3))
    try:
        with c(deep), torch.no_grad():
            deep(**inputs)
    finally:
        h.remove()
    b = inputs["pixel_values"].shape[0]
    first, last = Recorder.chosen[:b], Recorder.chosen[b:]
    with torch.no_grad():
        hidden = parts.encoder(inputs["pixel_values"], output_hidden_states=True).hidden_states[1]
        ref = []
        for i in range(b):
            x = torch.cat([hidden[i, :1], hidden[i, 1:][first[i]]])[None]  # cut after layer 1
            for layer in parts.encoder_layers[1:3]:
                x = layer(x, None)
            x = torch.cat([x[:, :1], x[:, 1:][:, last[i]]], dim=1)  # cut after layer 3
            ref.append(parts.encoder_layers[3](x, None)[0, 1:])
    assert seen["feats"].shape[1] == 4
    torch.testing.assert_close(seen["feats"], torch.stack(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [(1, 2), (1, 2, 3)])
def test_schedule_retain_one_is_identical(deep, layer):
    inputs = _inputs(deep)
    with torch.no_grad():
        ref = deep(**inputs).logits
    with tz.InEncoder(tz.get("tome", retain=1.0), layer=layer)(deep), torch.no_grad():
        out = deep(**inputs).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("layer,err", [((1, 4), r"\[1, 3\]"), ((3, 2), "increasing")])
def test_bad_schedules_are_clear_errors(deep, layer, err):
    with pytest.raises(ValueError, match=err):
        tz.InEncoder(tz.get("tome", retain=0.5), layer=layer)(deep)
