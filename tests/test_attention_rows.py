"""The one implementation of attention rows recomputed from q/k (tokenzip.llm.scores) and the encoder signals built
on it (tokenzip.adapters.attention), against the attention the layers really compute (eager weights)."""

import torch

from tokenzip.adapters.attention import attention_signals
from tokenzip.llm.scores import QK, received_attention, separate_qk, softmax_rows

from conftest import built


def _whisper_attention_weights():
    """The eager weights of the tiny Whisper's last encoder layer, and the input its attention received."""
    model = built("whisper", "eager")
    attn = model.model.encoder.layers[-1].self_attn
    cap = {}
    h = attn.register_forward_hook(lambda m, a, kw, out: cap.update(x=kw.get("hidden_states", a[0] if a else None),
                                                                    w=out[1]), with_kwargs=True)
    feats = torch.randn(2, 16, 80, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model.model.encoder(feats, output_attentions=True)
    finally:
        h.remove()
    return attn, cap["x"], cap["w"]


def test_separate_qk_rows_equal_the_eager_weights():
    attn, x, ref = _whisper_attention_weights()
    with torch.no_grad():
        qk = separate_qk(attn, x)
        probs = softmax_rows(qk.q, qk.k, qk.scale)
    torch.testing.assert_close(probs, ref.float(), atol=1e-6, rtol=1e-5)
    sig = attention_signals(attn, x, frozenset({"cls_attention", "keys"}), None, chunk=7)
    torch.testing.assert_close(sig["cls_attention"], ref.float().mean(dim=(1, 2)), atol=1e-6, rtol=1e-5)
    cls = attention_signals(attn, x, frozenset({"cls_attention"}), 3)
    torch.testing.assert_close(cls["cls_attention"], ref.float()[:, :, 3].mean(dim=1), atol=1e-6, rtol=1e-5)


def test_received_attention_stays_inside_segments_and_chunks_exactly():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 10, 4, generator=g), torch.randn(1, 2, 10, 4, generator=g)
    qk = QK(q, k, k, 0.5)
    bounds = [0, 3, 10]
    got = received_attention(qk, bounds, chunk=2)
    ref = torch.cat([softmax_rows(q[:, :, s:e], k[:, :, s:e], 0.5).sum(dim=(1, 2))
                     for s, e in zip(bounds[:-1], bounds[1:])], dim=-1)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got[0, :3].sum(), torch.tensor(3.0 * 2))  # each query's row sums to 1, per head
    whole = received_attention(qk)
    torch.testing.assert_close(whole.sum(), torch.tensor(10.0 * 2))


def test_softmax_rows_maps_query_heads_to_kv_heads_and_masks():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 3, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    probs = softmax_rows(q, k, 1.0)
    # query heads 0, 1 read kv head 0; 2, 3 read kv head 1 (transformers' repeat_kv)
    torch.testing.assert_close(probs[:, 1], torch.softmax(q[:, 1] @ k[:, 0].transpose(-1, -2), dim=-1))
    torch.testing.assert_close(probs[:, 2], torch.softmax(q[:, 2] @ k[:, 1].transpose(-1, -2), dim=-1))
    allowed = torch.tensor([True, True, False, True, False]).view(1, 1, 1, 5)
    masked = softmax_rows(q, k, 1.0, allowed)
    assert bool((masked[..., ~allowed[0, 0, 0]] == 0).all())
    torch.testing.assert_close(masked.sum(-1), torch.ones(1, 4, 3))
