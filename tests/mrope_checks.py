"""Checks shared by the tests of the adapters on tokenzip/adapters/mrope_vl.py (Qwen3.5, GLM-4.1V): kept tokens
reach the LLM with exactly the M-RoPE columns the model's own ``get_rope_index`` gives the FULL sequence, and
decoding continues at the uncompressed model's next position."""

import torch

from tokenzip.adapters import adapter_for
from tokenzip.compat import cache_kwarg, output_cache
from tokenzip.testing import CASES, default_samples


class LMCapture:
    """Every call of the language model: its position ids and attention mask."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("position_ids", "attention_mask")})

    def remove(self):
        self.handle.remove()


def assert_kept_positions(case, method):
    """``method`` on the case's left-padded batch: every kept media token and every text token reaches the LLM with
    the column the full sequence's ``get_rope_index`` gives it; ``rope_deltas`` and generate()'s first decoding
    step continue at ``max + 1``; a manual decoding step without position ids too."""
    model = CASES[case].build("sdpa")
    inputs = CASES[case].make_inputs(model, default_samples())
    full = CASES[case].position_ids(model, inputs)
    tokens = adapter_for(model).parts().media_token_ids
    cap = LMCapture(model)
    try:
        with method(model), torch.no_grad():
            model(**inputs)
            deltas = model.model.rope_deltas.clone()
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        cap.remove()
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    prefill, decode = cap.calls[0], cap.calls[2]  # forward, then generate's prefill and its first step
    ids = inputs["input_ids"]
    removed = 0
    for b, stats_b in enumerate(method.last_stats):
        keep = inputs["attention_mask"][b].bool().clone()
        for token in set(tokens.values()):
            keep &= ids[b] != token
        for modality, ms in stats_b.items():
            where = (ids[b] == tokens[modality]).nonzero().flatten()
            start = 0
            for it in ms.items:
                keep[where[start: start + it.tokens_in][it.index]] = True
                start += it.tokens_in
                removed += it.tokens_in - it.tokens_out
        lm_mask = prefill["attention_mask"][b].bool()
        assert torch.equal(prefill["position_ids"][1:, b][:, lm_mask], full[1:, b][:, keep]), f"sample {b}"
        top = int(full[1:, b][:, inputs["attention_mask"][b].bool()].max())
        assert decode["position_ids"][1:, b, -1].tolist() == [top + 1] * 3
        assert int(deltas[b]) == top + 1 - int(lm_mask.sum())
    assert removed > 0
    one = CASES[case].make_inputs(model, default_samples()[:1])
    top = int(CASES[case].position_ids(model, one)[1:].max())
    cap = LMCapture(model)
    try:
        with method(model), torch.no_grad():
            out = model(**one, use_cache=True)
            model(input_ids=out.logits[:, -1:].argmax(-1), **{cache_kwarg(model): output_cache(out)})
    finally:
        cap.remove()
    assert cap.calls[-1]["position_ids"][-3:, 0, -1].tolist() == [top + 1] * 3
