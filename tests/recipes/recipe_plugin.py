"""A pytest plugin (loaded with ``-p recipe_plugin``) that follows CONTRIBUTING.md's recipes with throwaway parts,
so tests/test_recipes.py can check that the invariant suite picks them up. ``TOKENZIP_RECIPE`` names the recipe:
``method``, ``signal`` or ``adapter``. Nothing here is imported by the regular test run."""

import os

import torch
import transformers

from tokenzip import ops
from tokenzip import signals as signal_table
from tokenzip.adapters import ADAPTERS, LlavaAdapter
from tokenzip.base import Compressor, MethodInfo
from tokenzip.methods import METHODS
from tokenzip.testing import CASES, Case, llava_inputs, tiny_llava

RECIPE = os.environ["TOKENZIP_RECIPE"]


class KeepFirst(Compressor):
    """Recipe "add a method": keep the first k tokens (test-only)."""

    info = MethodInfo("keep_first", "input", ("image", "audio"), "pre_llm", False, "test-only")

    def _compress(self, tokens, k, layout, signals):
        return ops.select(tokens, torch.arange(k, device=tokens.device).expand(tokens.shape[0], -1))


class Brightest(Compressor):
    """Recipe "add a signal": keep the k tokens of highest ``brightness`` (test-only)."""

    info = MethodInfo("brightest", "attention", ("image",), "pre_llm", False, "test-only")
    requires = ("brightness",)

    def _compress(self, tokens, k, layout, signals):
        return ops.select(tokens, ops.stable_topk(signals["brightness"], k))


class TinyLlavaVariant(transformers.LlavaForConditionalGeneration):
    """Recipe "add a model": a model class of its own (test-only)."""


class VariantAdapter(LlavaAdapter):
    model_classes = ("TinyLlavaVariant",)


def build_variant(attn: str) -> torch.nn.Module:
    base = tiny_llava(attn)
    model = TinyLlavaVariant._from_config(base.config, attn_implementation=attn)
    model.load_state_dict(base.state_dict())
    return model.eval()


if RECIPE == "method":  # one file + one registry line
    METHODS.append(KeepFirst)
elif RECIPE == "signal":  # declare it, let an adapter produce it, a method requires it
    signal_table.declare("brightness", ("B", "N"), "real", "mean of each token's features (test-only)")
    original_encode = LlavaAdapter.encode

    def encode(self, kwargs, needs):
        items = original_encode(self, kwargs, needs)
        for it in items:
            if "brightness" in needs:
                it.signals["brightness"] = it.tokens.float().mean(-1)
        return items

    LlavaAdapter.encode = encode
    LlavaAdapter.signals = LlavaAdapter.signals | {"brightness"}
    METHODS.append(Brightest)
elif RECIPE == "adapter":  # one adapter + one line in ADAPTERS + one Case
    ADAPTERS.insert(0, VariantAdapter)
    CASES["variant"] = Case("variant", build_variant, llava_inputs, VariantAdapter)
else:
    raise ValueError(f"unknown recipe {RECIPE!r}")
