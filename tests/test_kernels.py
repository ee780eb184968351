"""Hub kernels. From transformers 5.25 ``from_pretrained`` runs ``kernels.kernelize`` by default on CUDA: it swaps the
forward of every ``RMSNorm`` module for a hub kernel and, in attention classes decorated ``@use_kernelized_func``,
the instance's private wrapper of ``apply_rotary_pos_emb`` for a rotary kernel. Neither kernel runs on a CPU, so
these tests swap in CPU substitutes the way ``kernelize`` does (an instance ``forward`` bound with ``MethodType``;
the wrapper's ``forward`` for the rotary function, or the modeling module's function where the installed
transformers/``kernels`` gives attention layers no wrappers) and check that tokenzip's hooks and the attention rows it
recomputes from q/k follow the model.

What only a GPU can check: that the real hub kernels are numerically close enough to the reference that the
attention-ranked methods choose the same tokens (fp16/bf16 kernels can flip near-ties), and that the kernelized
modules keep firing the forward hooks tokenzip relies on under ``torch.compile``.
"""

from __future__ import annotations

import sys
from types import MethodType

import pytest
import torch

import tokenzip as tz
from tokenzip.compat import layer_function
from tokenzip.llm.scores import _standard_rope, separate_qk, softmax_rows
from tokenzip.testing import CASES, default_samples

ROPE = "apply_rotary_pos_emb"


class Substitutes:
    """CPU stand-ins for the hub kernels, counting their calls. ``reverse=True`` rotates by the opposite angle
    (a different, still valid RoPE), so that attention recomputed with the reference rotary no longer matches."""

    def __init__(self, reverse: bool = False):
        self.reverse = reverse
        self.calls = {"norm": 0, "rope": 0}
        self.swapped = {"norm": 0, "rope": 0}

    def rms_forward(self):
        subs = self

        def forward(module, hidden_states):
            subs.calls["norm"] += 1
            dtype = hidden_states.dtype
            x = hidden_states.to(torch.float32)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
            return module.weight * x.to(dtype)

        return forward

    def rope(self, q, k, cos, sin, unsqueeze_dim=1, *args, **kwargs):
        self.calls["rope"] += 1
        return _standard_rope(q, k, cos, -sin if self.reverse else sin, unsqueeze_dim)


def kernelize_on_cpu(model: torch.nn.Module, subs: Substitutes, monkeypatch) -> None:
    """Swap norms and the decoder's rotary function as ``kernels.kernelize`` does on CUDA."""
    rms = subs.rms_forward()
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = MethodType(rms, module)
            subs.swapped["norm"] += 1
        if name.endswith("Attention") and hasattr(module, "q_proj"):
            wrapper = layer_function(module, ROPE)
            if wrapper is not None:  # kernels installed: the per-instance wrapper kernelize swaps
                wrapper.forward = MethodType(lambda self, *a, **kw: subs.rope(*a, **kw), wrapper)
                subs.swapped["rope"] += 1
            elif callable(getattr(sys.modules[type(module).__module__], ROPE, None)):
                monkeypatch.setattr(sys.modules[type(module).__module__], ROPE, subs.rope)
                subs.swapped["rope"] += 1
    assert subs.swapped["norm"] > 0 and subs.swapped["rope"] > 0, subs.swapped


def _capture_layer(model, layer):
    """Hidden states, rotary tables and eager weights of one decoder layer's self-attention."""
    cap = {}
    attn = layer.self_attn

    def pre(m, args, kwargs):
        cap["x"] = kwargs.get("hidden_states", args[0] if args else None)
        cap["pe"] = kwargs.get("position_embeddings")

    def post(m, args, kwargs, out):
        cap["w"] = out[1]

    hs = [attn.register_forward_pre_hook(pre, with_kwargs=True),
          attn.register_forward_hook(post, with_kwargs=True)]
    return attn, cap, hs


@pytest.mark.parametrize("reverse", [False, True], ids=["same-math", "other-rotation"])
def test_attention_rows_follow_the_layers_swapped_rotary(reverse, monkeypatch):
    """The rows tokenzip recomputes from a decoder layer's q/k equal the eager weights that layer really computed,
    with its rotary function swapped like a hub kernel. With ``other-rotation`` the substitute rotates the other
    way: rows recomputed with the reference rotary would not match."""
    case = CASES["llava"]
    model = case.build("eager")
    subs = Substitutes(reverse=reverse)
    kernelize_on_cpu(model, subs, monkeypatch)
    inputs = case.make_inputs(model, default_samples()[:1])  # one sample: no padded rows
    layer = tz.adapters.adapter_for(model).parts().decoder_layers[1]
    attn, cap, hs = _capture_layer(model, layer)
    try:
        with torch.no_grad():
            model(**inputs, output_attentions=True)
    finally:
        for h in hs:
            h.remove()
    before = subs.calls["rope"]
    with torch.no_grad():
        qk = separate_qk(attn, cap["x"], position_embeddings=cap["pe"])
        n = qk.q.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        rows = softmax_rows(qk.q, qk.k, qk.scale, causal)
    assert subs.calls["rope"] > before  # tokenzip went through the swapped function
    torch.testing.assert_close(rows, cap["w"].float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["visionzip", "fastv"])
def test_methods_keep_their_invariants_on_a_kernelized_model(method, monkeypatch):
    """Numerically equal substitutes (what a correct kernel is): retain=1 equals the untouched kernelized model,
    and an attention-ranked method keeps exactly the tokens it keeps on the reference model."""
    case = CASES["llava"]
    ref = case.build("sdpa")
    model = case.build("sdpa")
    inputs = case.make_inputs(ref, default_samples())
    c = tz.get(method, retain=0.3)
    with torch.no_grad(), c(ref):
        ref_logits = ref(**inputs).logits
    ref_kept = [[it.index for it in s["image"].items] for s in c.last_stats]

    subs = Substitutes()
    kernelize_on_cpu(model, subs, monkeypatch)
    with torch.no_grad():
        plain = model(**inputs).logits
        with tz.get(method, retain=1.0)(model):
            full = model(**inputs).logits
        calls = dict(subs.calls)
        with c(model):
            logits = model(**inputs).logits
    assert subs.calls["norm"] > calls["norm"] and subs.calls["rope"] > calls["rope"]
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(full[real], plain[real], atol=0, rtol=0)
    kept = [[it.index for it in s["image"].items] for s in c.last_stats]
    for got, want in zip(kept, ref_kept):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
