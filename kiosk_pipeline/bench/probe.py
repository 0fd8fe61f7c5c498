"""Samples what a run costs while it runs: CPU and memory of each process, and the model server.

Counters are cumulative, so any window's figures are differences between interpolated samples,
chosen after the run (when the completions say where steady state was). CPU comes from
`/proc/<pid>/stat`, memory from the proportional set size in `/proc/<pid>/smaps_rollup`, so
shared-memory pages mapped by several stage processes are counted once in the total.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kiosk_pipeline.serving.device import DeviceStats

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class ProbeSample:
    """Cumulative figures at one instant (`at` is time.perf_counter, i.e. CLOCK_MONOTONIC)."""

    at: float
    cpu: dict[str, float]
    memory_mb: float
    server: DeviceStats | None
    machine_busy: float


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and every process below it, as they are now."""
    children = _children_map()
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _machine_busy() -> float:
    """CPU-seconds the whole machine has been busy (all processes, ours or not)."""
    with open("/proc/stat", "rb") as handle:
        ticks = [int(v) for v in handle.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / CLOCK_TICKS


def memory_mb(pid: int) -> float:
    """Proportional set size (RSS where smaps_rollup is missing), MiB."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * PAGE_KB / 1024
    except OSError:
        return 0.0


@dataclass
class Probe:
    """A sampling thread over process trees: `roots` maps a pid to the kind its tree counts as.

    `kinds` names individual descendants (e.g. which stage a process runs); a descendant not
    named inherits its root's kind. Kinds in `not_worker` (the model server) get CPU figures
    but are left out of the worker's memory. `server` returns the model server's counters.
    """

    roots: dict[int, str]
    server: Callable[[], DeviceStats | None]
    interval: float = 0.5
    not_worker: frozenset[str] = frozenset({"server"})
    kinds: dict[int, str] = field(default_factory=dict)
    samples: list[ProbeSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._last_cpu: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)

    def start(self) -> Probe:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def name(self, kinds: dict[int, str]) -> None:
        """Tell the probe which kind each (new) process is."""
        with self._lock:
            self.kinds.update(kinds)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def _tree(self) -> dict[int, str]:
        children = _children_map()
        with self._lock:
            named = dict(self.kinds)
        found: dict[int, str] = {}
        stack = [(pid, kind) for pid, kind in self.roots.items()]
        while stack:
            pid, inherited = stack.pop()
            kind = named.get(pid, inherited)
            found[pid] = kind
            stack.extend((child, kind) for child in children.get(pid, ()))
        return found

    def sample(self) -> None:
        """Take one sample now (also called by the thread every `interval`)."""
        memory = 0.0
        for pid, kind in self._tree().items():
            seconds = _cpu_seconds(pid)
            if seconds is None:
                continue
            self._last_cpu[pid] = (kind, seconds)
            if kind not in self.not_worker:
                memory += memory_mb(pid)
        cpu: dict[str, float] = {}
        for kind, seconds in self._last_cpu.values():
            cpu[kind] = cpu.get(kind, 0.0) + seconds
        self.samples.append(ProbeSample(time.perf_counter(), cpu, memory, self.server(),
                                        _machine_busy()))
