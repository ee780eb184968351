"""The generic encoder runner (tokenzip.encoder) and the encoder stage's schedule form on a tiny Whisper."""

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import adapter_for
from tokenzip.encoder import EncoderRunner, EncoderSpec, MergedTokens, check_cuts, schedule_counts
from tokenzip.output import CompressOutput
from tokenzip.testing import CASES, default_samples

from conftest import deep_whisper


def _inputs(model):
    return CASES["whisper"].make_inputs(model, default_samples())


def test_schedule_counts_reach_the_budget_exactly():
    assert schedule_counts(40, 10, 1) == [10]
    assert schedule_counts(40, 10, 3) == [25, 16, 10]
    assert schedule_counts(5, 5, 2) == [5, 5]
    counts = schedule_counts(1500, 7, 4)
    assert counts[-1] == 7 and counts == sorted(counts, reverse=True)
    with pytest.raises(ValueError, match="cuts"):
        schedule_counts(10, 5, 0)


def test_check_cuts_names_the_range():
    assert check_cuts(2, 4) == (2,) and check_cuts((1, 3), 4) == (1, 3)
    for bad in (0, 4, (2, 1), (1, 1), (), True, "2"):
        with pytest.raises(ValueError, match=r"\[1, 3\]"):
            check_cuts(bad, 4)


def test_runner_without_cuts_reproduces_the_encoder():
    model = deep_whisper()
    spec = adapter_for(model).encoder_spec()
    feats = _inputs(model)["input_features"]
    runner = EncoderRunner(spec, 2)
    with torch.no_grad():
        state = MergedTokens.start(runner.embed(feats))
        hidden = runner.run(state.hidden, 0, runner.cuts[0])
        out = runner.finish(MergedTokens(hidden, state.size, state.source))
        ref = model.model.encoder(feats).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_merged_tokens_carry_sizes_sources_and_reaverage_by_size():
    hidden = torch.arange(12, dtype=torch.float32).view(1, 6, 2)
    s0 = MergedTokens.start(hidden)
    # step 1: merge (0, 1) and (2, 3), keep 4, drop 5
    out1 = CompressOutput(tokens=torch.stack([hidden[0, :2].mean(0), hidden[0, 2:4].mean(0), hidden[0, 4]])[None],
                          source=torch.tensor([[0, 0, 1, 1, 2, -1]]), index=torch.tensor([[0, 2, 4]]))
    s1 = s0.after([out1])
    assert s1.size.tolist() == [[2.0, 2.0, 1.0]] and s1.source.tolist() == [[0, 0, 1, 1, 2, -1]]
    # step 2: merge slot 1 (2 inputs) with slot 2 (1 input): the method's plain mean is re-weighted by size
    out2 = CompressOutput(tokens=torch.stack([s1.hidden[0, 0], s1.hidden[0, 1:].mean(0)])[None],
                          source=torch.tensor([[0, 1, 1]]), index=torch.tensor([[0, 1]]))
    s2 = s0.after([out1]).after([out2])
    assert s2.size.tolist() == [[2.0, 3.0]] and s2.source.tolist() == [[0, 0, 1, 1, 1, -1]]
    torch.testing.assert_close(s2.hidden[0, 1], hidden[0, 2:5].mean(0))  # the mean of the 3 input frames
    torch.testing.assert_close(s2.hidden[0, 0], hidden[0, :2].mean(0))
    bias = s2.attention_bias()
    assert bias.shape == (1, 1, 1, 2)
    torch.testing.assert_close(bias.exp().flatten(), torch.tensor([2.0, 3.0]))
    assert s0.attention_bias() is None


def test_runner_is_not_whisper_specific():
    """Any encoder the adapter can describe: here a stack of plain SDPA blocks that read the additive mask."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x, mask):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return x + torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                                                        attn_mask=mask)[:, 0]

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([Block() for _ in range(3)])
    spec = EncoderSpec(embed=lambda x: x, layers=blocks, run_layer=lambda layer, h, m: layer(h, m),
                       attention=lambda layer: layer)
    runner = EncoderRunner(spec, (1, 2))
    x = torch.randn(2, 6, 8)
    state = MergedTokens.start(runner.run(runner.embed(x), 0, 1))
    keep = CompressOutput(tokens=state.hidden[:1, [0, 2, 4]], source=torch.tensor([[0, -1, 1, -1, 2, -1]]),
                          index=torch.tensor([[0, 2, 4]]))
    merged = torch.stack([state.hidden[1, :3].mean(0), state.hidden[1, 3:].mean(0)])
    merge_rows = CompressOutput(tokens=torch.cat([merged, state.hidden[1, :1]])[None],
                                source=torch.tensor([[0, 0, 0, 1, 1, 1]]), index=torch.tensor([[0, 3, 0]]))
    with pytest.raises(RuntimeError, match="different counts"):
        state.after([keep, CompressOutput(tokens=merged[None], source=torch.tensor([[0, 0, 0, 1, 1, 1]]),
                                          index=torch.tensor([[0, 3]]))])
    after = state.after([keep, merge_rows])
    assert runner.finish(after).shape == (2, 3, 8)
    assert runner.span_attention(2) is blocks[1]


@pytest.mark.parametrize("method", ["tome", "atome", "avgpool", "vad_prune", "attn_topk"])
def test_in_encoder_schedule_meets_the_budget_at_every_cut(method):
    model = deep_whisper()
    inputs = _inputs(model)
    lengths, masks = [], []
    enc = model.model.encoder

    def record(module, args):
        lengths.append(args[0].shape[1])
        masks.append(args[1])

    handles = [layer.register_forward_pre_hook(record) for layer in enc.layers]
    seen = []
    handles.append(model.model.decoder.layers[0].encoder_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["key_value_states"].shape[1]), with_kwargs=True))
    c = tz.InEncoder(tz.get(method, retain=0.25), layer=(1, 2, 3))
    assert c.layers == (1, 2, 3) and c.info.name == f"{method}@encoder1+2+3"
    try:
        with torch.no_grad(), c(model):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert lengths == [40, 25, 16, 10]
    assert set(seen) == {10}
    stats = c.last_stats[0]["audio"]
    assert stats.tokens_in == 40 and stats.tokens_out == 10
    for it in stats.items:  # the source/index of a schedule refer to the encoder's 40 frames
        assert it.source.shape == (40,) and int(it.source.max()) == 9 and it.index.shape == (10,)
        assert torch.equal(it.source[it.index], torch.arange(10))
    last = masks[-1]
    if last is not None:  # merging methods: every kept frame is counted once in the sizes
        assert last.shape == (inputs["input_features"].shape[0], 1, 1, 10)
        assert bool((last.exp().sum(-1) <= 40 + 1e-4).all())
    if method in ("tome", "atome", "avgpool"):  # nothing dropped: the sizes add up to all 40 frames
        torch.testing.assert_close(last.exp().sum(-1), torch.full_like(last[..., 0], 40.0))


def test_in_encoder_schedule_forms():
    c = tz.InEncoder(tz.AToMe(retain=0.5), layer=2)
    assert c.layer == 2 and c.layers == (2,) and c.info.name == "atome@encoder2"
    assert tz.InEncoder(tz.AToMe(retain=0.5), layer=[1, 2]).layer == (1, 2)
    for bad in ((2, 1), (), (1, 0), (1, 1)):
        with pytest.raises(ValueError, match="increasing sequence"):
            tz.InEncoder(tz.AToMe(retain=0.5), layer=bad)
    with pytest.raises(ValueError, match=r"layer must be an int in \[1, 3\]"):
        tz.InEncoder(tz.AToMe(retain=0.5), layer=(1, 4))(deep_whisper())


def test_in_encoder_schedule_generates():
    model = deep_whisper()
    inputs = _inputs(model)
    with torch.no_grad(), tz.InEncoder(tz.get("tome", retain=0.25), layer=(1, 3))(model):
        ids = model.generate(input_features=inputs["input_features"], max_new_tokens=3)
    assert ids.shape[0] == inputs["input_features"].shape[0]
