"""StallWatch: a partition with records waiting and a committed offset that stays put."""

from __future__ import annotations

import pytest

from phenocascade.streams.lag import PartitionLag, StallWatch


def _at(committed: int | None, end: int, partition: int = 0) -> PartitionLag:
    return PartitionLag("tier.quality", partition, committed, 0, end)


def test_a_partition_is_stalled_only_after_its_offset_stood_still_for_the_whole_span() -> None:
    watch = StallWatch(stall_s=60.0)
    assert watch.check([_at(8, 42)], now=0.0) == []
    assert watch.check([_at(8, 42)], now=59.0) == []
    stalled = watch.check([_at(8, 44)], now=61.0)  # more records arrive; the offset stands
    assert [(p.partition, s) for p, s in stalled] == [(0, 61.0)]


def test_progress_or_catching_up_resets_the_clock() -> None:
    watch = StallWatch(stall_s=60.0)
    watch.check([_at(8, 42), _at(None, 5, partition=1)], now=0.0)
    # Partition 0 commits, partition 1 (nothing committed yet) stays put.
    stalled = watch.check([_at(9, 42), _at(None, 5, partition=1)], now=70.0)
    assert [p.partition for p, _ in stalled] == [1]
    assert watch.check([_at(9, 42)], now=120.0) == []  # 50 s since it moved
    # Caught up: a lag of 1 is the marker that ends the last transaction, not a record.
    watch.check([_at(41, 42)], now=200.0)
    assert watch.check([_at(41, 44)], now=230.0) == []


def test_the_span_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        StallWatch(stall_s=0)
