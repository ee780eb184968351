"""ToMe-shaped merge primitives in tokenzip.ops: bipartite soft matching, size-weighted merge, source tracking, the
proportional-attention bias."""

import pytest
import torch

from tokenzip import ops


def _x(b=2, n=11, c=5, seed=0):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,r", [(11, 3), (10, 4), (3, 1), (7, 0), (9, 99)])
def test_bipartite_shapes_and_unmerge_is_exact_for_unmerged_tokens(n, r):
    x = _x(n=n)
    merge, unmerge = ops.bipartite_soft_matching(x, r)
    r_eff = min(r, (n + 1) // 2)
    y = merge(x)
    assert y.shape == (2, n - r_eff, 5)
    back = unmerge(y)
    assert back.shape == x.shape
    # a token whose row is unchanged by the merge (nothing merged into it, not merged away) comes back exactly
    sizes = merge(torch.ones(2, n))
    members = unmerge(sizes.unsqueeze(-1))[..., 0]
    alone = members == 1
    assert bool(alone.any())
    torch.testing.assert_close(back[alone], x[alone], rtol=0, atol=0)


def test_bipartite_merges_duplicates_and_conserves_size():
    x = _x(b=1, n=8, c=4)
    x[0, 2] = x[0, 5] * 3.0  # A token 2 and B token 5 point the same way: the strongest link
    merge, unmerge = ops.bipartite_soft_matching(x, 1)
    size = merge(torch.ones(1, 8))
    assert size.sum().item() == 8 and size.max().item() == 2
    y, s = ops.merge_wavg(merge, x)
    torch.testing.assert_close(s, size)
    slot = unmerge(torch.arange(7).view(1, 7, 1))[0, :, 0]
    assert slot[2] == slot[5]  # merged together
    torch.testing.assert_close(y[0, slot[5]], (x[0, 2] + x[0, 5]) / 2)
    torch.testing.assert_close(merge(x, "mean")[0, slot[5]], (x[0, 2] + x[0, 5]) / 2)
    # survivors keep their input order
    survivors = [slot[i].item() for i in range(8) if i != 2]
    assert survivors == list(range(7))
    with pytest.raises(ValueError, match="mode"):
        merge(x, "max")


def test_merge_wavg_is_the_mean_of_the_inputs_across_rounds():
    x = _x(b=1, n=16, c=3, seed=3)
    src = torch.arange(16).unsqueeze(0)
    tokens, size = x, None
    for r in (4, 3, 2):
        merge, unmerge = ops.bipartite_soft_matching(tokens, r)
        tokens, size = ops.merge_wavg(merge, tokens, size)
        src = ops.merge_source(unmerge, src, tokens.shape[1])
    assert tokens.shape[1] == 16 - 9 and size.sum().item() == 16
    for j in range(tokens.shape[1]):
        members = (src[0] == j).nonzero().flatten()
        assert size[0, j].item() == members.numel()
        torch.testing.assert_close(tokens[0, j], x[0, members].mean(0))


def test_protect_first_never_merges_the_cls_token():
    x = _x(b=1, n=9, c=4)
    x[0, 0] = x[0, 1]  # CLS identical to its B neighbour: would merge first without protection
    merge, unmerge = ops.bipartite_soft_matching(x, 4, protect_first=True)
    sizes = merge(torch.ones(1, 9))
    assert sizes[0, 0].item() == 1 and sizes.shape[1] == 9 - 4
    merged_plain, _ = ops.bipartite_soft_matching(x, 1)
    assert merged_plain(torch.ones(1, 9))[0, 0].item() == 2


def test_compose_source_and_merged_size():
    src = torch.tensor([[0, 0, 1, -1, 2]])
    step = torch.tensor([[1, -1, 0]])
    assert ops.compose_source(src, step).tolist() == [[1, 1, -1, -1, 0]]
    assert ops.merged_size(src, 3).tolist() == [[2.0, 1.0, 1.0]]
    assert ops.merged_size(step, 2, torch.tensor([[2.0, 1.0, 1.0]])).tolist() == [[1.0, 2.0]]


def test_size_bias_is_log_size_as_an_additive_key_mask():
    bias = ops.size_bias(torch.tensor([[1.0, 4.0, 0.0]]))
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.exp().flatten(), torch.tensor([1.0, 4.0, 1.0]))
    # as an SDPA mask it is ToMe's proportional attention: a size-s key counts like s copies of itself
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ops.size_bias(torch.tensor([[1.0, 3.0]])))
    k3, v3 = torch.cat([k, k[:, :, 1:].expand(-1, -1, 2, -1)], 2), torch.cat([v, v[:, :, 1:].expand(-1, -1, 2, -1)], 2)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k3, v3))


def test_original_assignment_chains_two_steps_by_hand():
    from tokenzip import ops

    # 5 original tokens -> 3 slots (0,1 merged into 0; 2 dropped; 3 -> 1; 4 -> 2), then slots -> 2 outputs
    source_in = torch.tensor([0, 0, -1, 1, 2])
    source, index = ops.original_assignment(source_in, torch.tensor([1, -1, 0]), torch.tensor([2, 0]))
    assert source.tolist() == [1, 1, -1, -1, 0]
    assert index.tolist() == [4, 0]  # slot 2's first original member is token 4, slot 0's is token 0
