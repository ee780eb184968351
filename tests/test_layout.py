"""The item layout with a time axis (tokenzip/layout.py): one description for every stage and the pictures."""

import pickle

import pytest
import torch

import tokenzip as tz
from tokenzip import layout as L


def test_segments_tile_space_and_time():
    lay = L.Layout([L.Segment("base", 1, 2, 2), L.Segment("crops", 1, 3, 4, newline=True)])
    assert lay.n == 16 and list(lay) == [(2, 2), (3, 4)]
    assert lay.frames() == [(0, 2, 2), (4, 3, 4)]
    assert lay.newline_mask() == [False] * 4 + ([False] * 3 + [True]) * 3
    clip = L.frames(3, 2, 5)
    assert clip.n == 30 and clip.num_frames == 3 and list(clip) == [(2, 5)] * 3
    assert [start for start, _, _ in clip.frames()] == [0, 10, 20]
    assert list(L.audio(7)) == [(1, 7)] and L.audio(7).segments[0].kind == "audio"
    assert pickle.loads(pickle.dumps(lay)) == lay and pickle.loads(pickle.dumps(lay)).segments == lay.segments


@pytest.mark.parametrize("spec,n,expected", [
    (None, 16, [(4, 4)]), (None, 6, [(1, 6)]), ((2, 3), 6, [(2, 3)]), ([(1, 1), (2, 2)], 5, [(1, 1), (2, 2)]),
])
def test_as_layout_accepts_the_old_forms(spec, n, expected):
    lay = L.as_layout(spec, n)
    assert isinstance(lay, L.Layout) and list(lay) == expected and L.as_layout(lay, n) is lay


@pytest.mark.parametrize("spec,n,err", [
    ((2, 3), 7, "does not tile 7"), ([(0, 3)], 0, "h, w >= 1"), ("ab", 2, "grid must be"),
    (L.frames(2, 2, 2), 9, "does not tile 9"),
])
def test_bad_layouts_are_clear_errors(spec, n, err):
    with pytest.raises(ValueError, match=err):
        L.as_layout(spec, n)


@pytest.mark.parametrize("kw,err", [({"kind": "pixels"}, "kind"), ({"t": 0}, ">= 1"), ({"w": 1, "newline": True},
                                                                                          "w >= 2")])
def test_bad_segments_are_clear_errors(kw, err):
    args = {"kind": "image", "t": 1, "h": 2, "w": 2, **kw}
    with pytest.raises(ValueError, match=err):
        L.Segment(**args)


def test_methods_take_a_layout_with_time_as_before():
    """A clip's per-frame grids are what spatial methods see: pooling a 3-frame layout equals pooling the same
    grids given the old way."""
    tokens = torch.randn(1, 3 * 2 * 4, 8)
    a = tz.get("avgpool", tokens=6).compress(tokens, grid=L.frames(3, 2, 4))
    b = tz.get("avgpool", tokens=6).compress(tokens, grid=[(2, 4)] * 3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.source, b.source)
