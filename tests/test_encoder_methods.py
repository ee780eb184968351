"""Layer forms resolved against the encoder's depth, ToMe's constant-r schedule, and the registered encoder-stage
methods (AuroraCap, FOLDER, EViT) on their own algorithms. The invariants (retain=1 exact, budget, batch, SDPA/eager,
cache, restore, determinism) come from tests/test_invariants.py through the registry."""

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import adapter_for
from tokenzip.encoder.runner import (
    SCHEDULES,
    check_layer_form,
    constant_r_counts,
    layer_token_counts,
    resolve_layers,
    schedule_counts,
)
from tokenzip.methods.evit import EViTFuse
from tokenzip.methods.folder import FolderMerge
from tokenzip.testing import CASES, default_samples

from conftest import built, deep_whisper


def _lengths(model, c, case="whisper"):
    """The token count each encoder layer runs on during one compressed forward."""
    inputs = CASES[case].make_inputs(model, default_samples())
    layers = adapter_for(model).parts().encoder_layers
    lengths = []
    handles = [layer.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1])) for layer in layers]
    try:
        with torch.no_grad(), c(model):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return lengths


# ---- schedules ------------------------------------------------------------------------------------------------------
def test_constant_r_counts_remove_the_same_number_and_land_on_the_budget():
    assert constant_r_counts(40, 10, 3) == [30, 20, 10]
    assert constant_r_counts(41, 10, 3) == [30, 20, 10]  # 31 = 11 + 10 + 10: the first cut takes the extra one
    assert constant_r_counts(42, 10, 3) == [31, 20, 10]
    assert constant_r_counts(5, 5, 2) == [5, 5] and constant_r_counts(9, 1, 1) == [1]
    for n, k, cuts in [(577, 58, 23), (1500, 150, 31), (16, 3, 5), (7, 6, 4)]:
        counts = constant_r_counts(n, k, cuts)
        removed = [a - b for a, b in zip([n] + counts, counts)]
        assert counts[-1] == k and len(counts) == cuts
        assert max(removed) - min(removed) <= 1 and removed == sorted(removed, reverse=True)
    with pytest.raises(ValueError, match="cuts"):
        constant_r_counts(10, 5, 0)
    assert set(SCHEDULES) == {"ratio", "constant_r"} and SCHEDULES["ratio"] is schedule_counts


def test_layer_token_counts_per_layer():
    assert layer_token_counts(40, 10, (1, 2, 3), 4, "constant_r") == [40, 30, 20, 10]
    assert layer_token_counts(40, 10, (1, 2, 3), 4) == [40, 25, 16, 10]
    assert layer_token_counts(40, 10, (3,), 4) == [40, 40, 40, 10]
    assert layer_token_counts(40, 40, (1,), 2) == [40, 40]
    c = tz.InEncoder(tz.ToMe(retain=0.25), layer=(1, 2, 3), schedule="constant_r")
    assert c.layer_counts(40, 4) == [40, 30, 20, 10]
    with pytest.raises(RuntimeError, match="resolved when the method is installed"):
        tz.InEncoder(tz.ToMe(retain=0.25), layer="every").layer_counts(40, 4)


# ---- layer forms ----------------------------------------------------------------------------------------------------
def test_layer_forms_resolve_against_the_depth():
    assert resolve_layers("every", 4) == (1, 2, 3) and resolve_layers("all", 4) == (1, 2, 3)
    assert resolve_layers("every", 2) == (1,)
    assert resolve_layers(("last", 1), 4) == (3,) and resolve_layers(["last", 3], 4) == (1, 2, 3)
    assert resolve_layers(-1, 4) == (3,) and resolve_layers(-3, 4) == (1,)
    assert resolve_layers((1, -1), 4) == (1, 3) and resolve_layers((-2, -1), 4) == (2, 3)
    assert resolve_layers(2, 4) == (2,) and resolve_layers((1, 3), 4) == (1, 3)
    assert check_layer_form([1, 2]) == (1, 2) and check_layer_form("all") == "every"
    names = [tz.InEncoder(tz.ToMe(retain=0.5), layer=f).info.name for f in (2, (1, 3), -1, "all", ("last", 2))]
    assert names == ["tome@encoder2", "tome@encoder1+3", "tome@encoder[-1]", "tome@encoder[every]",
                     "tome@encoder[last2]"]


@pytest.mark.parametrize("bad", [True, "first", (), (2, 1), (1, 1), (-1, -2), (-1, 1), 1.0, ("last",),
                                 ("last", 1, 2), None])
def test_bad_layer_forms_name_the_allowed_forms(bad):
    with pytest.raises(ValueError, match=r"layer must be an int >= 0 .*\"every\" or \"all\".*\(\"last\", k\)"):
        tz.InEncoder(tz.ToMe(retain=0.5), layer=bad)


@pytest.mark.parametrize("bad,match", [
    (("last", 4), r"k in \[1, 3\] for this encoder \(4 layers\)"),
    (-4, r"cuts in \[1, 3\] \(or \[-3, -1\] counted from the end\)"),
    ((3, -1), r"cuts in \[1, 3\]"),  # both name layer 3
    ((1, 5), r"cuts in \[1, 3\]"),
])
def test_out_of_range_layers_name_the_range(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_layers(bad, 4)


def test_cut_zero_is_a_form_the_adapter_must_support():
    """Cut 0 (before the first layer) resolves as itself (never from a negative or depth form); an adapter whose
    encoder stage cannot cut there (all but Qwen2-VL/2.5-VL) says so, naming its range."""
    assert resolve_layers(0, 4) == (0,) and resolve_layers((0, 2), 4) == (0, 2) and check_layer_form([0, -1]) == (0, -1)
    assert tz.InEncoder(tz.ToMe(retain=0.5), layer=0).info.name == "tome@encoder0"
    with pytest.raises(ValueError, match=r"\[1, 1\].*cut 0, before the first layer, is not supported by this adapter"):
        tz.InEncoder(tz.ToMe(retain=0.5), layer=0)(built("whisper"))


def test_last_k_form_needs_k_at_least_one_and_depth_two():
    with pytest.raises(ValueError, match=r"\(\"last\", k\) needs an int k >= 1"):
        check_layer_form(("last", 0))
    with pytest.raises(ValueError, match="no cut that leaves a layer after it"):
        resolve_layers("every", 1)


def test_schedule_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"schedule must be one of \['constant_r', 'ratio'\]"):
        tz.InEncoder(tz.ToMe(retain=0.5), layer=1, schedule="linear")


def test_adapters_report_their_encoder_depth():
    assert adapter_for(built("whisper")).encoder_depth() == 2
    assert adapter_for(deep_whisper()).encoder_depth() == 4
    llava = built("llava")  # 3 CLIP layers, the LLM reads hidden_states[-2]: the stage runs 2
    assert adapter_for(llava).encoder_depth() == len(adapter_for(llava).parts().encoder_layers) - 1 == 2


@pytest.mark.parametrize("layer,cuts,lengths", [
    ("every", (1, 2, 3), [40, 30, 20, 10]),
    (("last", 2), (2, 3), [40, 40, 20, 10]),
    (-1, (3,), [40, 40, 40, 10]),
    ((1, -1), (1, 3), [40, 20, 20, 10]),
])
def test_depth_forms_on_a_four_layer_whisper(layer, cuts, lengths):
    c = tz.InEncoder(tz.ToMe(retain=0.25), layer=layer, schedule="constant_r" if layer == "every" else "ratio")
    assert c.layers is None or c.layers == cuts
    assert _lengths(deep_whisper(), c) == lengths
    assert c.layers == cuts
    assert c.last_stats[0]["audio"].tokens_out == 10


def test_a_form_resolves_again_for_each_model():
    c = tz.InEncoder(tz.ToMe(retain=0.25), layer="every")
    assert _lengths(deep_whisper(), c) == [40, 25, 16, 10] and c.layers == (1, 2, 3)
    assert _lengths(built("whisper"), c) == [40, 10] and c.layers == (1,)


def test_out_of_range_form_is_refused_before_patching():
    model = deep_whisper()
    with pytest.raises(ValueError, match=r"k in \[1, 3\]"):
        tz.InEncoder(tz.ToMe(retain=0.25), layer=("last", 4))(model)
    assert "forward" not in model.__dict__ and getattr(model, "_tokenzip_patch", None) is None


def test_llava_resolves_forms_up_to_the_feature_layer():
    model = built("llava")
    c = tz.InEncoder(tz.ToMe(tokens=5), layer=-1)
    lengths = _lengths(model, c, case="llava")
    assert c.layers == (1,)
    assert lengths == [17, 6]  # [CLS] + 16 patches; the cut keeps [CLS] + 5; the tower's last layer is not run


# ---- the registered methods -----------------------------------------------------------------------------------------
def test_auroracap_is_tome_in_every_block_with_constant_r():
    c = tz.get("auroracap", retain=0.25)
    assert isinstance(c, tz.InEncoder) and isinstance(c.method, tz.ToMe)
    assert (c.layer, c.schedule, c.info.name, c.info.stage) == ("every", "constant_r", "auroracap", "encoder")
    model = deep_whisper()
    assert _lengths(model, c) == [40, 30, 20, 10]
    assert c.last_stats[0]["audio"].tokens_out == 10
    assert c == tz.AuroraCap(retain=0.25) and c != tz.AuroraCap(retain=0.25, schedule="ratio")
    assert _lengths(model, tz.AuroraCap(retain=0.25, schedule="ratio")) == [40, 25, 16, 10]


def test_folder_folds_in_the_last_blocks():
    c = tz.get("folder", retain=0.25)
    assert isinstance(c.method, FolderMerge) and c.layer == ("last", 1) and c.info.name == "folder"
    assert _lengths(deep_whisper(), c) == [40, 40, 40, 10]  # 75% removed at once: more than one ToMe round
    assert _lengths(deep_whisper(), tz.Folder(retain=0.25, blocks=2)) == [40, 40, 20, 10]
    with pytest.raises(ValueError, match="blocks must be an int >= 1"):
        tz.Folder(retain=0.25, blocks=0)
    with pytest.raises(ValueError, match="alpha must be a finite float >= 0"):
        tz.Folder(retain=0.25, alpha=-1.0)


def _unit_keys(n, seed=0):
    return torch.randn(1, n, 6, generator=torch.Generator().manual_seed(seed))


def test_folder_merge_folds_past_half_and_averages():
    tokens, keys = _unit_keys(12, 1), _unit_keys(12, 2)
    out = FolderMerge(tokens=3, alpha=0.0).compress(tokens, keys=keys)
    assert out.tokens.shape == (1, 3, 6)  # 12 -> 3 needs two folds (at most half per round)
    for slot, members in enumerate(out.groups(0)):
        torch.testing.assert_close(out.tokens[0, slot], tokens[0, members].mean(0))


def test_folder_merge_without_informativity_is_one_tome_round():
    tokens, keys = _unit_keys(16, 3), _unit_keys(16, 4)
    for k in (8, 11, 15):
        ours = FolderMerge(tokens=k, alpha=0.0).compress(tokens, keys=keys)
        tome = tz.ToMe(tokens=k).compress(tokens, keys=keys)
        assert torch.equal(ours.source, tome.source)
        torch.testing.assert_close(ours.tokens, tome.tokens)


def test_folder_merge_keeps_tokens_the_cls_token_attends_to_out_of_merges():
    tokens, keys = _unit_keys(10, 5), _unit_keys(10, 6)
    keys[0, 0], keys[0, 4] = keys[0, 1], keys[0, 5]  # A tokens 0 and 4 duplicate B tokens 1 and 5: the best links
    cls = torch.full((1, 10), 0.01)
    cls[0, [0, 4]] = 0.5  # ... but the [CLS] token attends to them
    plain = FolderMerge(tokens=8, alpha=0.0).compress(tokens, keys=keys, cls_attention=cls)
    assert [0, 1] in plain.groups(0) and [4, 5] in plain.groups(0)
    out = FolderMerge(tokens=8, alpha=5.0).compress(tokens, keys=keys, cls_attention=cls)
    assert [0] in out.groups(0) and [4] in out.groups(0)
    assert out.tokens.shape[1] == 8


def test_evit_fuse_keeps_the_attentive_tokens_and_fuses_the_rest_by_attention():
    tokens = _unit_keys(8, 7)
    cls = torch.tensor([[0.05, 0.30, 0.05, 0.20, 0.10, 0.25, 0.03, 0.02]])
    out = EViTFuse(tokens=3).compress(tokens, cls_attention=cls)
    assert out.groups(0) == [[0, 2, 3, 4, 6, 7], [1], [5]]  # the 2 most attended (0.30, 0.25) kept, the rest fused
    rest = [0, 2, 3, 4, 6, 7]
    weights = cls[0, rest] / cls[0, rest].sum()
    torch.testing.assert_close(out.tokens[0, 0], (tokens[0, rest] * weights[:, None]).sum(0))
    torch.testing.assert_close(out.tokens[0, 1:], tokens[0, [1, 5]])
    zero = EViTFuse(tokens=2).compress(tokens, cls_attention=torch.tensor([[0, 1.0, 0, 0, 0, 0, 0, 0]]))
    torch.testing.assert_close(zero.tokens[0, 0], tokens[0, [0, 2, 3, 4, 5, 6, 7]].mean(0))  # no mass: uniform
    one = EViTFuse(tokens=1).compress(tokens, cls_attention=cls)  # a budget of one token: everything fused
    assert one.groups(0) == [list(range(8))]


def test_evit_places_its_cuts_where_the_paper_does_scaled_to_the_depth():
    c = tz.get("evit", retain=0.25)
    assert isinstance(c.method, EViTFuse) and c.layer is None and c.info.name == "evit"
    assert _lengths(deep_whisper(12), c) == [40] * 4 + [25] * 3 + [16] * 3 + [10] * 2  # the 4th, 7th, 10th layers
    assert c.layers == (4, 7, 10)
    _lengths(deep_whisper(4), c)
    assert c.layers == (1, 2, 3)
    _lengths(built("whisper"), c)
    assert c.layers == (1,)
    fixed = tz.EViT(retain=0.25, layer=-1)
    assert _lengths(deep_whisper(4), fixed) == [40, 40, 40, 10] and fixed.layers == (3,)
