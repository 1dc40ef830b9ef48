"""The coalescer's pacing, with time passed in (no clock, no sleeps)."""

from __future__ import annotations

from lmstream_nb._throttle import Coalescer


def test_first_chunk_is_painted_at_once() -> None:
    c = Coalescer(interval=0.05)
    assert c.add(10.0, "Hel") == ("Hel", "")


def test_later_chunks_wait_for_the_interval_and_are_joined() -> None:
    c = Coalescer(interval=0.05)
    c.add(10.0, "a")
    assert c.add(10.01, "b") is None
    assert c.add(10.02, "c", "r") is None
    assert c.due(10.04) is None, "not yet"
    assert c.next_paint_at() == 10.05
    assert c.due(10.05) == ("bc", "r")
    assert c.due(10.2) is None, "nothing pending"


def test_a_chunk_after_a_quiet_spell_is_painted_at_once() -> None:
    c = Coalescer(interval=0.05)
    c.add(10.0, "a")
    assert c.add(11.0, "b") == ("b", "")


def test_paint_rate_is_bounded_whatever_the_chunk_rate() -> None:
    c = Coalescer(interval=0.05)
    paints = 0
    now = 0.0
    text = []
    for i in range(10_000):  # 10,000 chunks in one second
        now = i / 10_000
        painted = c.add(now, "x")
        if painted is None:
            painted = c.due(now)
        if painted is not None:
            paints += 1
            text.append(painted[0])
    rest = c.take(now)
    if rest is not None:
        text.append(rest[0])
    assert paints <= 21
    assert "".join(text) == "x" * 10_000, "nothing is lost or repeated"


def test_take_flushes_everything() -> None:
    c = Coalescer()
    c.add(1.0, "a")
    c.add(1.001, "b")
    assert c.take(1.002) == ("b", "")
    assert c.take(1.003) is None
