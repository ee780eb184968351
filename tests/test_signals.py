"""Signals are declared once (tokenzip/signals.py); methods declare truthfully what they need; an adapter that cannot
produce a required signal is refused before anything is patched. Every test here runs over the registries."""

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import ADAPTERS, adapter_for
from tokenzip.base import MethodInfo
from tokenzip.signals import SIGNALS, declare
from tokenzip.testing import CASES

from conftest import built, synthetic_signals

WIDTH = 6
# stage "input" methods change the model's inputs and have no tensor-level compress (tests/test_input_stage.py)
TENSOR_METHODS = [m for m in tz.METHODS if m.info.stage != "input"]
METHOD_IDS = [m.info.name for m in TENSOR_METHODS]


def _only(sig, names):
    return {k: v for k, v in sig.items() if k in names}


@pytest.mark.parametrize("method", TENSOR_METHODS, ids=METHOD_IDS)
def test_every_declared_name_is_a_declared_signal(method):
    c = method(retain=0.5)  # what a configured instance needs (FastV's depends on its `score`)
    assert set(c.requires) | set(c.optional) <= set(SIGNALS)
    assert not set(c.requires) & set(c.optional)


@pytest.mark.parametrize("method", TENSOR_METHODS, ids=METHOD_IDS)
def test_required_signals_alone_suffice(method):
    """``optional`` means truly optional: each method runs with nothing but its required signals."""
    tokens = torch.randn(2, 16, WIDTH, generator=torch.Generator().manual_seed(1))
    c = method(retain=0.5)
    out = c.compress(tokens, **_only(synthetic_signals(2, 16, WIDTH), c.requires))
    assert out.tokens.shape == (2, 8, WIDTH)


@pytest.mark.parametrize("method", TENSOR_METHODS, ids=METHOD_IDS)
def test_each_missing_required_signal_is_a_clear_error(method):
    c = method(retain=0.5)
    tokens = torch.randn(1, 16, WIDTH)
    sig = synthetic_signals(1, 16, WIDTH)
    for name in c.requires:
        with pytest.raises(ValueError, match=f"needs signals.*{name}"):
            c.compress(tokens, **_only(sig, set(c.requires) - {name}))


def test_signal_shapes_are_checked_from_the_declaration():
    c = tz.get("cls_topk", retain=0.5)
    with pytest.raises(ValueError, match="cls_attention has 5 tokens"):
        c.compress(torch.randn(1, 4, WIDTH), cls_attention=torch.rand(1, 5))
    with pytest.raises(ValueError, match=r"cls_attention must be \[B, N\]"):
        c.compress(torch.randn(1, 4, WIDTH), cls_attention=torch.rand(1, 4, 1))
    with pytest.raises(ValueError, match="unknown signals"):
        c.compress(torch.randn(1, 4, WIDTH), cls_attention=torch.rand(1, 4), loudness=torch.rand(1, 4))
    with pytest.raises(ValueError, match="already declared"):
        declare("keys", ("B", "N"), "real", "twice")


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.__name__)
def test_adapters_declare_only_declared_signals(adapter):
    assert adapter.signals <= set(SIGNALS)


@pytest.mark.parametrize("case", list(CASES))
def test_a_signal_the_adapter_cannot_produce_is_refused_before_patching(case):
    model = built(case)
    absent = sorted(set(SIGNALS) - adapter_for(model).signals)
    assert absent  # LLM-stage signals are never an adapter's, so every adapter lacks one

    class NeedsAbsent(tz.Compressor):  # test-only method: requires a signal this adapter does not produce
        info = MethodInfo("needs_absent", "input", CASES[case].modalities, "pre_llm", False, "test")
        requires = (absent[0],)

        def _compress(self, tokens, k, layout, signals):
            return tz.ops.select(tokens, torch.arange(k).expand(tokens.shape[0], -1))

    forward, generate = model.forward, model.generate
    with pytest.raises(TypeError, match=rf"requires signals \['{absent[0]}'\], which"):
        NeedsAbsent(retain=0.5)(model)
    assert model.forward == forward and model.generate == generate
    assert getattr(model, "_tokenzip_patch", None) is None
