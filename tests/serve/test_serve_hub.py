"""The hub's text store (``_hub.Text``): blocks and a tail must slice exactly like one string.

Property-based: any sequence of appended deltas, with blocks made tiny so that every boundary
case (a slice inside a block, across blocks, across the block/tail seam, past the end) comes up.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstream_nb.serve import _hub

deltas = st.lists(st.text(alphabet="ab\u00e9\u4e2d\U0001f600", max_size=9), max_size=40)


@pytest.mark.parametrize("block", [1, 3, 8, _hub.BLOCK])
@settings(max_examples=60, deadline=None)
@given(pieces=deltas, bounds=st.lists(st.tuples(st.integers(-2, 400), st.integers(-2, 400))))
def test_text_slices_like_a_string(
    block: int, pieces: list[str], bounds: list[tuple[int, int]]
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_hub, "BLOCK", block)
        text = _hub.Text()
        whole = ""
        for piece in pieces:
            text.append(piece)
            whole += piece
            assert len(text) == len(whole)
            for start, stop in bounds:
                start, stop = max(0, start), max(0, stop)
                assert text.slice(start, stop) == whole[start:stop]
        assert str(text) == whole


def test_text_keeps_few_objects_for_many_tiny_deltas() -> None:
    """What made a long answer cost 15 times its size: one str object per delta."""
    text = _hub.Text()
    for _ in range(100_000):
        text.append("abc")
    blocks, tail = len(text._blocks), len(text._tail)
    assert blocks == 300_000 // _hub.BLOCK
    assert tail <= _hub.BLOCK // 3 + 1
    assert len(text) == 300_000
    assert text.slice(299_990, 300_010) == ("abc" * 100_000)[299_990:]
