"""Stage "encoder" on towers whose LLM tokens are groups of patches (tokenzip/adapters/grouped_tower.py): Gemma 3's
4x4 average pool and SmolVLM's pixel shuffle. The invariants (retain=1 exact, exact budget, batch == singles, SDPA ==
eager, cached == uncached, restored) run on the ``gemma3`` / ``smolvlm`` cases by registration; here: the later
layers and the projector against the stock modules run by hand on the kept patches, padding patches, schedules,
and errors."""

import copy

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import adapter_for
from tokenzip.adapters.grouped_tower import TowerImage, block_groups, shuffle_groups
from tokenzip.encoder import MergedTokens
from tokenzip.output import CompressOutput
from tokenzip.testing import CASES, default_samples

from conftest import built

CASES_HERE = ["gemma3", "smolvlm"]


def _tower_inputs(model, inputs, case):
    """(tiles [n, 3, S, S], patch mask [n, P, P], vision model, projector) as the stock model feeds its tower."""
    core = model.model
    if case == "gemma3":
        vm = getattr(core.vision_tower, "vision_model", core.vision_tower)
        px = inputs["pixel_values"]
        p = px.shape[-1] // model.config.vision_config.patch_size
        return px, torch.ones(px.shape[0], p, p, dtype=torch.bool), vm, core.multi_modal_projector
    vm = core.vision_model
    px = inputs["pixel_values"].flatten(0, 1)
    real = (px != 0).flatten(1).any(-1)
    size = model.config.vision_config.patch_size
    m = inputs["pixel_attention_mask"].flatten(0, 1)[real]
    p = m.shape[-1] // size
    patch_mask = m.view(-1, p, size, p, size).any(4).any(2)
    return px[real], patch_mask, vm, core.connector


def _features(model, call):
    seen = {}

    def hook(module, args, kwargs):
        seen["x"] = kwargs["mm_encoder_outputs"]["image"].pooler_output

    handle = model.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen["x"]


def _run(layers, hidden, valid):
    mask = torch.zeros(hidden.shape[0], 1, 1, hidden.shape[1]).masked_fill(~valid[:, None, None, :],
                                                                          torch.finfo(hidden.dtype).min)
    for layer in layers:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@pytest.mark.parametrize("case", CASES_HERE)
def test_kept_groups_are_the_stock_tower_and_projector_on_the_kept_patches(case):
    """A selection at cut 1: each kept token is what the stock layers after the cut (on the kept patches only, padding
    masked as the model masks it), the post-norm and the stock projector make of its group."""
    model = built(case)
    inputs = CASES[case].make_inputs(model, default_samples())
    c = tz.InEncoder(tz.get("cls_topk", tokens=5), layer=1)
    with c(model):
        feats = _features(model, lambda: model(**inputs))
    kept = [it.index for s in c.last_stats for ms in s.values() for it in ms.items]
    tiles, patch_mask, vm, project = _tower_inputs(model, inputs, case)
    adapter = adapter_for(model)
    p = patch_mask.shape[-1]
    groups = block_groups(p, p // adapter.side) if case == "gemma3" else \
        shuffle_groups(lambda ids: model.model.connector.pixel_shuffle(ids, adapter.scale), p)
    valid = patch_mask.flatten(1)
    layers = list(vm.encoder.layers)
    with torch.no_grad():
        emb = vm.embeddings(tiles) if case == "gemma3" else vm.embeddings(tiles, patch_mask)
        hidden = _run(layers[:1], emb, valid)
        assert feats.reshape(-1, 5, feats.shape[-1]).shape[0] == tiles.shape[0] == len(kept)
        for i, index in enumerate(kept):
            patches = groups[index].flatten().sort().values  # the kept groups' patches, in raster order
            later = _run(layers[1:], hidden[i: i + 1, patches], valid[i: i + 1, patches])
            grid = torch.zeros(1, p * p, hidden.shape[-1])
            grid[0, patches] = vm.post_layernorm(later)[0]
            expected = project(grid)[0, index]
            torch.testing.assert_close(feats.reshape(-1, 5, feats.shape[-1])[i], expected, atol=1e-5, rtol=1e-5)


def test_merging_never_mixes_padding_into_a_real_patch():
    """Two groups of 2 patches (width 1 each): group 0's second patch is padding; merged, the second patch is group
    1's alone, the first the size-weighted mean, and the merged group's patches are real where any member's is."""
    hidden = torch.tensor([[[1.0, 100.0], [3.0, 5.0], [7.0, 9.0]]])
    state = MergedTokens(hidden, torch.tensor([[1.0, 3.0, 1.0]]), torch.arange(3)[None])
    im = TowerImage(state, torch.tensor([[True, False], [True, True], [False, False]]))
    out = CompressOutput(tokens=torch.zeros(1, 2, 2), source=torch.tensor([[0, 0, 1]]), index=torch.tensor([[0, 2]]))
    after = im.after(out)
    assert after.valid.tolist() == [[True, True], [False, False]]
    torch.testing.assert_close(after.state.hidden[0, 0], torch.tensor([(1.0 + 3 * 3.0) / 4, 5.0]))
    assert after.state.size.tolist() == [[4.0, 1.0]]


def _deep(case, layers=4):
    """The case's model with ``layers`` SigLIP layers (copies of its two, perturbed so they differ)."""
    model = copy.deepcopy(built(case))
    core = model.model
    vm = getattr(core.vision_tower, "vision_model", core.vision_tower) if case == "gemma3" else core.vision_model
    torch.manual_seed(1)
    while len(vm.encoder.layers) < layers:
        layer = copy.deepcopy(vm.encoder.layers[len(vm.encoder.layers) % 2])
        with torch.no_grad():
            for prm in layer.parameters():
                prm.add_(0.05 * torch.randn_like(prm))
        vm.encoder.layers.append(layer)
    return model


@pytest.mark.parametrize("case", CASES_HERE)
def test_a_schedule_reaches_the_budget_at_the_last_cut(case):
    model = _deep(case)
    inputs = CASES[case].make_inputs(model, default_samples())
    with torch.no_grad():
        ref = model(**inputs).logits
        with tz.InEncoder(tz.ToMe(retain=1.0), layer=(1, 2, 3))(model):
            same = model(**inputs).logits
    torch.testing.assert_close(same, ref, atol=1e-4, rtol=1e-4)
    c = tz.InEncoder(tz.ToMe(tokens=5), layer=(1, 2, 3))
    with c(model):
        feats = _features(model, lambda: model(**inputs))
    items = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    n = adapter_for(model).side ** 2
    assert all((it.tokens_in, it.tokens_out) == (n, 5) for it in items)
    assert feats.numel() == len(items) * 5 * feats.shape[-1]
    with pytest.raises(ValueError, match=r"in \[1, 3\]"):
        tz.InEncoder(tz.ToMe(tokens=5), layer=4)(model)


@pytest.mark.parametrize("case", CASES_HERE)
def test_encoder_stage_errors(case):
    model = built(case)
    with pytest.raises(ValueError, match=r"in \[1, 1\]"):
        tz.InEncoder(tz.ToMe(tokens=5), layer=2)(model)
    assert CASES[case].adapter.stages == ("pre_llm", "encoder", "llm")
    assert "projected" not in CASES[case].adapter.encoder_signals
