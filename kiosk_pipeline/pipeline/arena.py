"""The shared-memory arena: one segment, owned by the supervisor, carved into job regions.

Pixel data is written once into the arena by its producer and read in place by its consumer;
only `Region` descriptors (offset, shape, dtype) cross process boundaries. The supervisor is the
only process that creates, allocates from and unlinks the segment, so a stage process that dies
can neither leak nor corrupt the allocator, and on Python < 3.13 attaching processes must not
register the segment with the resource tracker (which would unlink it when they exit).
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import sys
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

ALIGNMENT = 64


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(frozen=True)
class Region:
    """A typed array inside the arena, as sent between processes."""

    offset: int
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class RegionLayout:
    """Lays out several regions back to back inside one allocation, before it is made."""

    def __init__(self) -> None:
        self._parts: list[tuple[tuple[int, ...], str, int]] = []
        self.nbytes = 0

    def add(self, shape: tuple[int, ...], dtype: str = "float32") -> int:
        """Reserve a region; returns its index for `regions(base)`."""
        self._parts.append((tuple(int(s) for s in shape), dtype, self.nbytes))
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.nbytes += _aligned(max(size, 1))
        return len(self._parts) - 1

    def regions(self, base: int) -> list[Region]:
        return [Region(base + offset, shape, dtype) for shape, dtype, offset in self._parts]


class ArenaFull(Exception):
    """The request can never fit: it is larger than the whole arena."""


class Allocator:
    """First-fit over free extents, coalescing on free: low offsets are reused first, so the
    pages a busy worker touches stay compact and resident memory tracks the work in flight."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = [0]
        self._ends: list[int] = [size]
        self._used: dict[int, int] = {}
        self._touched = 0

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def top(self) -> int:
        """End of the highest block in use; nothing above it is live."""
        if self._ends and self._ends[-1] == self.size:
            return self._starts[-1]
        return self.size

    def take_idle_span(self, slack: int) -> tuple[int, int] | None:
        """(start, end) of memory handed out since the last call but now above `top`, once it
        is at least `slack` bytes; the caller returns those pages to the OS."""
        top = self.top
        if self._touched - top < slack:
            return None
        span, self._touched = (top, self._touched), top
        return span

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new block, or None while it does not fit yet."""
        need = _aligned(max(nbytes, 1))
        if need > self.size:
            raise ArenaFull(f"needs {need} bytes, the arena has {self.size}")
        for i, (start, end) in enumerate(zip(self._starts, self._ends, strict=True)):
            if end - start >= need:
                if end - start == need:
                    del self._starts[i], self._ends[i]
                else:
                    self._starts[i] = start + need
                self._used[start] = need
                self._touched = max(self._touched, start + need)
                return start
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        end = offset + size
        i = bisect.bisect_left(self._starts, offset)
        if i < len(self._starts) and self._starts[i] == end:
            self._starts[i] = offset
            end = self._ends[i]
            if i > 0 and self._ends[i - 1] == offset:
                self._ends[i - 1] = end
                del self._starts[i], self._ends[i]
        elif i > 0 and self._ends[i - 1] == offset:
            self._ends[i - 1] = end
        else:
            self._starts.insert(i, offset)
            self._ends.insert(i, end)


class Arena:
    """A view of the arena segment in one process; the owner also unlinks it."""

    def __init__(self, shm: SharedMemory, owner: bool) -> None:
        self._shm = shm
        self.owner = owner
        self.name = shm.name
        self.size = shm.size
        self._pages = _map_again(shm) if owner else None

    @classmethod
    def create(cls, nbytes: int) -> Arena:
        return cls(SharedMemory(create=True, size=nbytes), owner=True)

    @classmethod
    def attach(cls, name: str) -> Arena:
        if sys.version_info >= (3, 13):
            return cls(SharedMemory(name=name, track=False), owner=False)
        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None
        try:
            return cls(SharedMemory(name=name), owner=False)
        finally:
            resource_tracker.register = register

    def release(self, start: int, end: int) -> None:
        """Give the pages wholly inside [start, end) back to the OS (owner only); they read as
        zeros after. Only for memory no process is using: pages of a shared segment stay
        resident once touched, so without this one large image would pin its memory for the
        life of the pod."""
        start = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        end = end // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._pages.madvise(mmap.MADV_REMOVE, start, end - start)

    def view(self, region: Region) -> np.ndarray:
        """A writable array over the region, without copying."""
        return np.ndarray(region.shape, dtype=region.dtype, buffer=self._shm.buf,
                          offset=region.offset)

    def close(self) -> None:
        """Detach; arrays still viewing the segment keep their mapping until collected."""
        with contextlib.suppress(BufferError):
            self._shm.close()
        if self._pages is not None:
            self._pages.close()
        if self.owner:
            self._shm.unlink()


def _map_again(shm: SharedMemory) -> mmap.mmap:
    """A second mapping of the segment, for madvise: SharedMemory does not expose its own."""
    fd = os.open(f"/dev/shm/{shm.name.lstrip('/')}", os.O_RDWR)
    try:
        return mmap.mmap(fd, shm.size)
    finally:
        os.close(fd)
