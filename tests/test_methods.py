"""Tensor-level tests of every registered method (no model): exact budget, a consistent CompressOutput, batch
independence, determinism, plus one check of each method's own algorithm."""

import importlib
import math

import pytest
import torch

import tokenzip as tz
from tokenzip import ops

from conftest import synthetic_signals

torch.set_num_threads(1)

D = 8
# stage "input" methods change the model's inputs and have no tensor-level compress (tests/test_input_stage.py)
TENSOR_METHODS = [m for m in tz.METHODS if m.info.stage != "input"]


def signals(b: int, n: int, seed: int = 0, t: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random tokens and every declared signal (built from tokenzip/signals.py; LLM-space width 6)."""
    tokens = torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed))
    return tokens, synthetic_signals(b, n, 6, seed=seed + 1, t=t)


def test_synthetic_signals_cover_every_signal():
    from tokenzip.base import SIGNALS

    assert set(signals(1, 4)[1]) == set(SIGNALS)


_TO_HIDDEN = torch.randn(6, D, generator=torch.Generator().manual_seed(99))


def declared(method, only_required=False):
    """The signals a configured method declares (a class stands for its default configuration; FastV's needs
    depend on its ``score`` field, so they are read from an instance)."""
    c = method(retain=1.0) if isinstance(method, type) else method
    return set(c.requires) if only_required else set(c.requires) | set(c.optional)


def wanted(method, sig, only_required=False):
    """The signals the method declares (required + optional), as the patch hands them over. At the LLM stage
    ``text`` holds hidden states of the tokens' own width, so it is mapped (row-wise) to ``D`` there."""
    names = declared(method, only_required)
    out = {k: v for k, v in sig.items() if k in names}
    if method.info.stage == "llm" and "text" in out:
        out["text"] = out["text"] @ _TO_HIDDEN
    return out


def check_output(out, tokens, k):
    b, n, _ = tokens.shape
    assert out.tokens.shape == (b, k, tokens.shape[-1])
    assert out.source.shape == (b, n) and out.index.shape == (b, k)
    assert out.source.dtype == torch.long and out.index.dtype == torch.long
    assert torch.isfinite(out.tokens).all()
    for i in range(b):
        idx, src = out.index[i], out.source[i]
        assert bool((idx[1:] > idx[:-1]).all()), "index must be strictly ascending"
        assert bool((src >= -1).all() and (src < k).all())
        assert torch.equal(src[idx], torch.arange(k)), "every representative maps to its own slot"
        for slot, members in enumerate(out.groups(i)):
            assert members and members[0] == int(idx[slot]), "each group is non-empty; index is its first member"


# (N, layout, ks): square, ragged multi-grid (anyres-like), 1-D (audio), CLS + grid, video frames, tiny N
COMBOS = [
    (2, None, [1]),
    (3, None, [1, 2]),
    (4, [(2, 2)], [1, 2, 3]),
    (16, None, [1, 2, 5, 8, 15]),
    (16, [(2, 2), (3, 4)], [1, 2, 3, 7, 15]),
    (20, [(1, 20)], [1, 3, 10, 19]),
    (36, [(1, 1), (5, 7)], [1, 2, 9, 35]),
    (27, [(3, 3)] * 3, [1, 2, 3, 4, 13, 26]),
]


@pytest.mark.parametrize("method", TENSOR_METHODS, ids=lambda m: m.info.name)
def test_exact_budget_and_consistent_output(method):
    for n, grid, ks in COMBOS:
        tokens, sig = signals(2, n, seed=n)
        for k in ks:
            out = method(tokens=1).compress(tokens, grid=grid, k=k, **wanted(method, sig))
            check_output(out, tokens, k)


@pytest.mark.parametrize("method", TENSOR_METHODS, ids=lambda m: m.info.name)
def test_budget_from_retain_and_identity(method):
    tokens, sig = signals(1, 16)
    out = method(retain=0.25).compress(tokens, **wanted(method, sig))
    check_output(out, tokens, 4)
    full = method(retain=1.0).compress(tokens, **wanted(method, sig))
    assert torch.equal(full.tokens, tokens) and torch.equal(full.source[0], torch.arange(16))


@pytest.mark.parametrize("method", TENSOR_METHODS, ids=lambda m: m.info.name)
def test_batch_rows_are_independent(method):
    n, grid = 16, [(2, 2), (3, 4)]
    tokens, sig = signals(3, n, seed=7, t=6)
    names = declared(method)
    if "text_mask" in names:  # padded prompts in the batch (only a method that sees the mask can ignore padding)
        sig["text_mask"][1, 4:] = False
        sig["text_mask"][2, 2:] = False
    c = method(retain=0.4)
    batch = c.compress(tokens, grid=grid, **wanted(method, sig))
    for i in range(3):
        one = {name: v[i: i + 1] for name, v in sig.items()}
        t_real = int(sig["text_mask"][i].sum())
        for name in ("text", "text_mask", "text_attention"):
            one[name] = one[name][:, :t_real]
        single = c.compress(tokens[i: i + 1], grid=grid, **wanted(method, one))
        torch.testing.assert_close(batch.tokens[i: i + 1], single.tokens, atol=1e-5, rtol=1e-5)
        assert torch.equal(batch.source[i], single.source[0]) and torch.equal(batch.index[i], single.index[0])


@pytest.mark.parametrize("method", TENSOR_METHODS, ids=lambda m: m.info.name)
def test_deterministic_with_ties(method):
    tokens, sig = signals(2, 25, seed=3)
    tokens[:, 10:] = tokens[:, :1]  # many identical tokens, keys and scores: tie-breaking must be stable
    for name in ("keys", "projected"):
        sig[name][:, 10:] = sig[name][:, :1]
    sig["cls_attention"][:, 10:] = sig["cls_attention"][:, :1]
    runs = [method(tokens=6).compress(tokens.clone(), **wanted(method, sig)) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].source, runs[1].source) and torch.equal(runs[0].index, runs[1].index)
    check_output(runs[0], tokens, 6)


@pytest.mark.parametrize("method", TENSOR_METHODS, ids=lambda m: m.info.name)
def test_missing_required_signal_is_a_clear_error(method):
    tokens, sig = signals(1, 9)
    for name in declared(method, only_required=True):
        partial = {k: v for k, v in wanted(method, sig).items() if k != name}
        with pytest.raises(ValueError, match=name):
            method(tokens=3).compress(tokens, **partial)


# every configuration whose needs differ: requires is what the configured instance truly needs
CONFIGS = [pytest.param(m, {}, id=m.info.name) for m in TENSOR_METHODS] + [
    pytest.param(tz.FastV, {"score": "text"}, id="fastv-text")]


@pytest.mark.parametrize("method,kwargs", CONFIGS)
def test_required_signals_suffice(method, kwargs):
    """The required signals alone run the method, with and without text after the item."""
    for t in (5, 0):
        tokens, sig = signals(2, 16, seed=t, t=t)
        c = method(tokens=4, **kwargs)
        check_output(c.compress(tokens, **wanted(c, sig, only_required=True)), tokens, 4)


@pytest.mark.parametrize("score,needs", [("last", {"last_attention"}), ("text", {"last_attention", "text_attention"})])
def test_fastv_declares_what_its_score_needs(score, needs):
    c = tz.FastV(retain=0.5, score=score)
    assert set(c.requires) == needs and not c.optional and c.signals_needed() == needs
    tokens, sig = signals(1, 9)
    for name in needs:
        partial = {k: v for k, v in sig.items() if k in needs - {name}}
        with pytest.raises(ValueError, match=f"fastv needs signals \\['{name}'\\]"):
            c.compress(tokens, **partial)


def test_llm_stage_computes_exactly_the_declared_signals():
    for m in tz.METHODS:
        if m.info.stage == "llm":
            c = m(retain=0.5)
            assert c.signals_needed() == frozenset(c.requires) | frozenset(c.optional), m.info.name


MINE = {"bilinear", "tome", "divprune", "dpc_knn", "cls_topk", "prumerge_plus", "visionzip", "vispruner", "trim"}


def test_method_infos():
    assert MINE <= {m.info.name for m in tz.METHODS}
    for m in tz.METHODS:
        assert m.info.family != "query" or m.info.query_aware
        assert "arXiv:" in m.info.reference and "arXiv:" in (m.__doc__ or "")
        if m.info.name in MINE:
            assert m.info.stage == "pre_llm" and "image" in m.info.modalities
            assert m.info.query_aware == (m.info.family == "query")
            # methods that work on any 1-D sequence also serve audio
            assert ("audio" in m.info.modalities) == (m.info.family in ("transformation", "similarity"))


def test_methods_claim_only_modalities_an_adapter_compresses():
    from tokenzip.adapters import ADAPTERS

    compressed = {m for a in ADAPTERS for m in a.modalities}
    assert "video" in compressed  # LLaVA-OneVision's clips (adapters/onevision_video.py)
    for m in tz.METHODS:
        assert set(m.info.modalities) <= compressed, m.info.name


@pytest.mark.parametrize("name,kwargs", [
    ("visionzip", {"contextual_ratio": 1.0}), ("visionzip", {"contextual_ratio": -0.1}),
    ("visionzip", {"contextual": "max"}), ("sparsevlm", {"neighbors": 0}),
    ("vispruner", {"important_ratio": 1.5}), ("prumerge_plus", {"knn": 0}), ("dpc_knn", {"neighbors": 0}),
])
def test_bad_parameters(name, kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ValueError, match=key):
        tz.get(name, retain=0.5, **kwargs)


# ---- one check per algorithm ----------------------------------------------------------------------------------------

def test_random_is_a_seeded_selection():
    tokens, _ = signals(1, 30)
    a, b, c = (tz.get("random", tokens=8, seed=s).compress(tokens) for s in (0, 0, 1))
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)
    assert torch.equal(a.tokens[0], tokens[0, a.index[0]]) and int((a.source >= 0).sum()) == 8


def test_avgpool_means_regions():
    tokens, _ = signals(1, 36)
    grid = [(1, 1), (5, 7)]
    out = tz.get("avgpool", tokens=9).compress(tokens, grid=grid)
    assign = ops.pool_assignment(grid, 9)
    assert torch.equal(out.source[0], assign)
    for slot in range(9):
        torch.testing.assert_close(out.tokens[0, slot], tokens[0, assign == slot].mean(0))


@pytest.mark.parametrize("h,w,k", [(6, 6, 9), (6, 6, 7), (4, 8, 5), (1, 12, 5)])
def test_bilinear_interpolates_a_linear_ramp_exactly(h, w, k):
    rr, cc = torch.meshgrid(torch.arange(h, dtype=torch.float), torch.arange(w, dtype=torch.float), indexing="ij")
    tokens = torch.stack([rr, cc, 2 * rr - cc + 1], dim=-1).reshape(1, h * w, 3)
    out = tz.get("bilinear", tokens=k).compress(tokens, grid=(h, w))
    rows, cols, last = ops.grid_shape(h, w, k)
    expect = []
    for r in range(rows):
        ncol = cols if r < rows - 1 else last
        for c in range(ncol):  # cell centres of an align_corners=False resize: no clamping when shrinking
            y, x = (r + 0.5) * h / rows - 0.5, (c + 0.5) * w / ncol - 0.5
            expect.append([y, x, 2 * y - x + 1])
    torch.testing.assert_close(out.tokens[0], torch.tensor(expect), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.source[0], ops.pool_assignment([(h, w)], k))


def test_tome_merges_the_most_similar_pair_first():
    tokens, _ = signals(1, 12, seed=5)
    tokens[0, 7] = tokens[0, 4] + 0.01  # 4 is in set A (even), 7 in set B (odd)
    out = tz.get("tome", tokens=11).compress(tokens)
    groups = out.groups(0)
    assert [4, 7] in groups and sum(len(g) == 1 for g in groups) == 10
    torch.testing.assert_close(out.tokens[0, groups.index([4, 7])], tokens[0, [4, 7]].mean(0))
    # with keys, similarity is measured on the keys instead
    keys = torch.randn(1, 12, 4, generator=torch.Generator().manual_seed(9))
    keys[0, 3] = keys[0, 10] * 2.0  # identical direction: cosine 1 (10 in A, 3 in B)
    assert [3, 10] in tz.get("tome", tokens=11).compress(tokens, keys=keys).groups(0)


def test_tome_sizes_weight_later_rounds():
    tokens = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    out = tz.get("tome", tokens=2).compress(tokens)
    assert sorted(out.groups(0)) == [[0, 1, 2, 3], [4, 5]]
    torch.testing.assert_close(out.tokens[0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_divprune_is_greedy_max_min():
    tokens, _ = signals(1, 30, seed=2)
    k = 7
    out = tz.get("divprune", tokens=k).compress(tokens)
    dist = 1 - ops.cosine_similarity_matrix(tokens)[0]
    nn = dist.masked_fill(torch.eye(30, dtype=torch.bool), float("inf")).min(1).values
    picked = [int(nn.argmax())]
    while len(picked) < k:
        to_set = dist[:, picked].min(1).values
        to_set[picked] = -1
        picked.append(int(to_set.argmax()))
    assert out.index[0].tolist() == sorted(picked)
    assert torch.equal(out.tokens[0], tokens[0, sorted(picked)])


def test_dpc_knn_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, -10.0, 0]])
    sizes = [5, 6, 7]
    label = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    perm = torch.randperm(18, generator=g)
    label = label[perm]
    tokens = (centres[label] + 0.1 * torch.randn(18, 4, generator=g)).unsqueeze(0)
    out = tz.get("dpc_knn", tokens=3).compress(tokens)
    groups = sorted(out.groups(0))
    assert groups == sorted([(label == i).nonzero().flatten().tolist() for i in range(3)])
    for slot, members in enumerate(out.groups(0)):
        torch.testing.assert_close(out.tokens[0, slot], tokens[0, members].mean(0))


def test_cls_topk_keeps_the_highest():
    tokens, sig = signals(2, 20, seed=4)
    out = tz.get("cls_topk", tokens=5).compress(tokens, cls_attention=sig["cls_attention"])
    for i in range(2):
        top = torch.topk(sig["cls_attention"][i], 5).indices.sort().values
        assert torch.equal(out.index[i], top) and torch.equal(out.tokens[i], tokens[i, top])


def test_prumerge_plus_keeps_outliers_and_merges_by_attention():
    n, k = 36, 9
    tokens, sig = signals(1, n, seed=6)
    attn = torch.full((1, n), 1.0)
    attn[0, [3, 20, 31]] = 50.0  # clear IQR outliers
    attn = attn / attn.sum()
    out = tz.get("prumerge_plus", tokens=k, knn=n).compress(tokens, cls_attention=attn, keys=sig["keys"])
    # the 3 outliers plus 6 tokens spread evenly over the non-outliers each head one output token
    rest = [i for i in range(n) if i not in (3, 20, 31)]
    kept = {3, 20, 31} | {rest[(j * len(rest)) // 6] for j in range(6)}
    reps = torch.tensor(sorted(kept))
    keys = torch.nn.functional.normalize(sig["keys"][0], dim=-1)
    groups = out.groups(0)
    assert sorted(m for g in groups for m in g) == list(range(n))  # knn=N: nothing is dropped
    for slot, members in enumerate(groups):
        rep = [m for m in members if m in kept]
        assert len(rep) == 1
        # every pruned token joined its most key-similar kept token; weights 1 (kept) and attention (pruned)
        for m in members:
            if m != rep[0]:
                assert int(reps[(keys[reps] @ keys[m]).argmax()]) == rep[0]
        w = torch.tensor([1.0 if m == rep[0] else float(attn[0, m]) for m in members])
        torch.testing.assert_close(out.tokens[0, slot], (w[:, None] * tokens[0, members]).sum(0) / w.sum())
    # the outliers are capped at k, highest attention first: at k=2, tokens 20 and 31 head the two groups
    bumped = attn + torch.arange(n) * 1e-6
    out1 = tz.get("prumerge_plus", tokens=2).compress(tokens, cls_attention=bumped, keys=sig["keys"])
    assert set(out1.source[0][[20, 31]].tolist()) == {0, 1}


def test_visionzip_dominant_and_contextual_counts():
    n, k = 40, 20
    tokens, sig = signals(1, n, seed=8)
    out = tz.get("visionzip", tokens=k).compress(tokens, **wanted(tz.VisionZip, sig))
    n_ctx = math.floor(k * 10 / 64 + 0.5)
    dominant = torch.topk(sig["cls_attention"][0], k - n_ctx).indices.tolist()
    groups = out.groups(0)
    assert all([d] in groups for d in dominant)
    contextual = [g for g in groups if g not in [[d] for d in dominant]]
    assert len(contextual) == n_ctx and sum(len(g) for g in contextual) == n - len(dominant)
    rest = sorted(set(range(n)) - set(dominant))
    targets = {rest[(i * len(rest)) // n_ctx] for i in range(n_ctx)}
    mean = tz.get("visionzip", tokens=k, contextual="mean").compress(tokens, **wanted(tz.VisionZip, sig))
    assert torch.equal(mean.source, out.source) and torch.equal(mean.index, out.index)
    for slot, g in enumerate(groups):
        torch.testing.assert_close(mean.tokens[0, slot], tokens[0, g].mean(0))
        if g in contextual:  # default: the target plus the mean of the tokens that joined it
            (t,) = targets & set(g)
            others = [m for m in g if m != t]
            expect = tokens[0, t] + (tokens[0, others].mean(0) if others else 0)
            torch.testing.assert_close(out.tokens[0, slot], expect)
        else:
            assert torch.equal(out.tokens[0, slot], tokens[0, g[0]])
    # at least one dominant token even at k=1, and a ratio of 0 keeps only dominant tokens
    assert tz.get("visionzip", tokens=1, contextual_ratio=0.9).compress(
        tokens, **wanted(tz.VisionZip, sig)).index[0].tolist() == [int(sig["cls_attention"][0].argmax())]
    only = tz.get("visionzip", tokens=5, contextual_ratio=0.0).compress(tokens, **wanted(tz.VisionZip, sig))
    assert only.index[0].tolist() == sorted(torch.topk(sig["cls_attention"][0], 5).indices.tolist())


@pytest.mark.parametrize("contextual,expect", [("sum", [[9.0], [5.0]]), ("mean", [[9.0], [3.25]])])
def test_visionzip_contextual_token_by_hand(contextual, expect):
    """5 tokens, k = 2 at ratio 0.5: token 0 is dominant; of the rest (1, 2, 3, 4) the first is the one target and
    2, 3, 4 join it. Reference code: target + mean(joined) = 1 + (2 + 5 + 5) / 3 = 5; the option averages all
    four: (1 + 2 + 5 + 5) / 4 = 3.25."""
    tokens = torch.tensor([[[9.0], [1.0], [2.0], [5.0], [5.0]]])
    attn = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]])
    out = tz.get("visionzip", tokens=2, contextual_ratio=0.5, contextual=contextual).compress(tokens,
                                                                                            cls_attention=attn)
    assert out.groups(0) == [[0], [1, 2, 3, 4]]
    assert out.tokens[0].tolist() == expect


def test_vispruner_keeps_important_then_drops_duplicates():
    n, k = 16, 8
    tokens, _ = signals(1, n, seed=11)
    attn = torch.linspace(1.0, 0.1, n).unsqueeze(0)  # token i is the i-th most attended
    # rest (attention order) = 4..15 split A = 4, 6, 8, ..., B = 5, 7, ...; make A token 6 duplicate B token 11
    tokens[0, 6] = tokens[0, 11] * 3.0
    out = tz.get("vispruner", tokens=k, important_ratio=0.5).compress(tokens, cls_attention=attn)
    kept = out.index[0].tolist()
    assert {0, 1, 2, 3} <= set(kept)  # floor(8 * 0.5) important tokens
    # 12 candidates, 4 to keep: 8 dropped in one round, the duplicate first
    assert 6 not in kept and len(kept) == k
    one = tz.get("vispruner", tokens=13).compress(tokens, cls_attention=attn)  # 6 important, 7 of 10: drop 3
    assert 6 not in one.index[0].tolist()


def test_trim_keeps_the_tokens_closest_to_the_text():
    n, k = 20, 4
    tokens, sig = signals(1, n, seed=12)
    g = torch.Generator().manual_seed(1)
    proj = (torch.eye(n) + 0.05 * torch.randn(n, n, generator=g)).unsqueeze(0)  # near-orthogonal image tokens
    text = proj[:, [15, 2, 9]] * 2.0  # the prompt "talks about" tokens 2, 9 and 15
    out = tz.get("trim", tokens=k).compress(tokens, projected=proj, text=text,
                                            text_mask=torch.ones(1, 3, dtype=torch.bool))
    groups = out.groups(0)
    assert [2] in groups and [9] in groups and [15] in groups
    rest = [i for i in range(n) if i not in (2, 9, 15)]
    assert rest in groups
    torch.testing.assert_close(out.tokens[0, groups.index(rest)], tokens[0, rest].mean(0))
    # k = 1: one token, the mean of everything
    torch.testing.assert_close(tz.get("trim", tokens=1).compress(
        tokens, projected=proj, text=text, text_mask=torch.ones(1, 3, dtype=torch.bool)).tokens[0, 0],
        tokens[0].mean(0))
    with pytest.raises(ValueError, match="text"):
        tz.get("trim", tokens=2).compress(tokens, projected=proj, text=torch.randn(1, 3, 5),
                                          text_mask=torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("neighbors,expect", [(None, 3), (5, 5)])
def test_sparsevlm_density_counts_as_many_neighbours_as_clusters(monkeypatch, neighbors, expect):
    """N = 20, k = 8, recycle 0.375: c = round(3.0) = 3 recycled slots, 5 keep their tokens, 15 are deleted and the
    top floor(0.3 * 15) + 1 = 5 of them are clustered. The reference code's density counts c = 3 neighbours."""
    sparsevlm = importlib.import_module("tokenzip.methods.sparsevlm")  # tz.methods is the registry function
    calls = []

    def spy(x, k, n_neighbors):
        calls.append((x.shape[0], k, n_neighbors))
        return dpc_knn_centres(x, k, n_neighbors)

    dpc_knn_centres = sparsevlm.dpc_knn_centres
    monkeypatch.setattr(sparsevlm, "dpc_knn_centres", spy)
    tokens, sig = signals(1, 20, seed=13)
    c = tz.SparseVLM(tokens=8, recycle=0.375, neighbors=neighbors)
    check_output(c.compress(tokens, **wanted(c, sig)), tokens, 8)
    assert calls == [(5, 3, expect)]
