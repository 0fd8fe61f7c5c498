import multiprocessing as mp
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiosk_pipeline.pipeline.arena import Allocator, Arena, ArenaFull, Region, RegionLayout


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=60))
def test_allocator_never_overlaps_and_coalesces(operations):
    allocator = Allocator(64 * 1024)
    live: dict[int, int] = {}
    for do_free, size in operations:
        if do_free and live:
            offset = sorted(live)[size % len(live)]
            allocator.free(offset)
            del live[offset]
            continue
        offset = allocator.allocate(size)
        if offset is None:
            continue
        assert offset % 64 == 0
        for other, other_size in live.items():
            assert offset + size <= other or other + other_size <= offset
        live[offset] = size
    for offset in list(live):
        allocator.free(offset)
    assert allocator.used_bytes == 0
    assert allocator.allocate(64 * 1024) == 0


def test_allocator_waits_when_full_and_rejects_impossible():
    allocator = Allocator(1024)
    first = allocator.allocate(600)
    assert allocator.allocate(600) is None
    allocator.free(first)
    assert allocator.allocate(600) == 0
    with pytest.raises(ArenaFull):
        allocator.allocate(2048)


def test_layout_places_regions_back_to_back():
    layout = RegionLayout()
    a = layout.add((3, 5), "float32")
    b = layout.add((7,), "int32")
    regions = layout.regions(base=128)
    assert regions[a] == Region(128, (3, 5), "float32")
    assert regions[b].offset == 128 + 64
    assert layout.nbytes == 128


def _child_writes(name: str, region: Region) -> None:
    arena = Arena.attach(name)
    arena.view(region)[:] = np.arange(region.shape[0], dtype=region.dtype)
    arena.close()


def test_child_process_writes_in_place_and_exit_does_not_unlink():
    arena = Arena.create(1 << 20)
    try:
        region = Region(4096, (1000,), "float32")
        child = mp.get_context("spawn").Process(target=_child_writes, args=(arena.name, region))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        np.testing.assert_array_equal(arena.view(region), np.arange(1000, dtype="float32"))
        again = Arena.attach(arena.name)
        assert again.view(region)[999] == 999
        again.close()
    finally:
        arena.close()


def test_idle_span_is_what_was_handed_out_above_the_live_top():
    allocator = Allocator(1 << 20)
    low = allocator.allocate(1000)
    high = allocator.allocate(200_000)
    assert allocator.top == 1024 + 200_000
    assert allocator.take_idle_span(slack=1) is None
    allocator.free(high)
    assert allocator.top == 1024
    assert allocator.take_idle_span(slack=300_000) is None
    assert allocator.take_idle_span(slack=100_000) == (1024, 1024 + 200_000)
    assert allocator.take_idle_span(slack=1) is None
    allocator.free(low)
    assert allocator.top == 0


def backed_bytes(arena: Arena) -> int:
    """Bytes of the segment the OS holds in memory (tmpfs counts only pages written)."""
    return os.stat(f"/dev/shm/{arena.name.lstrip('/')}").st_blocks * 512


def test_release_returns_pages_to_the_os_and_keeps_live_ones():
    arena = Arena.create(64 << 20)
    try:
        live = Region(0, (1 << 20,), "uint8")
        idle = Region(1 << 20, (40 << 20,), "uint8")
        arena.view(live)[:] = 7
        arena.view(idle)[:] = 9
        assert backed_bytes(arena) >= 41 << 20
        arena.release(live.nbytes, live.nbytes + idle.nbytes)
        assert backed_bytes(arena) <= (1 << 20) + 8192
        assert (arena.view(live) == 7).all()
        assert not arena.view(idle).any()
    finally:
        arena.close()
