"""The explicit timing context: spans report to the active recorder only."""

from tokenzip import timing


def test_spans_reach_the_recorder_and_nothing_else():
    seen = []

    def start(kind):
        seen.append(("start", kind))
        return lambda: seen.append(("stop", kind))

    with timing.span("signals"):  # no recorder: a no-op
        pass
    assert seen == []
    with timing.recording(start):
        with timing.span("signals"):
            seen.append("work")
    assert seen == [("start", "signals"), "work", ("stop", "signals")]
    with timing.span("signals"):
        pass
    assert len(seen) == 3
