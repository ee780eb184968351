"""LLaVA-1.5 encoder stage (tz.InEncoder on the CLIP tower through the generic encoder runner): what the later
tower layers and the projector see, against the stock tower's own layers run on the kept tokens."""

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import adapter_for
from tokenzip.testing import CASES, default_samples

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


@pytest.mark.parametrize("layer,err", [((1, 2), r"\[1, 1\]"), (2, r"\[1, 1\]"), (0, ">= 1"), ((1, 1), "increasing")])
def test_bad_cuts_are_clear_errors(layer, err):
    with pytest.raises(ValueError, match=err):
        tz.InEncoder(tz.get("tome", retain=0.5), layer=layer)(built(CASE))


def test_projected_is_not_available_inside_the_tower():
    with pytest.raises(TypeError, match="projected"):
        tz.InEncoder(tz.get("trim", retain=0.5), layer=1)(built(CASE))
