"""The inference stage: batches tiles of all jobs in flight and keeps the model server busy.

One process owns the gRPC channel. Its loop takes fetched jobs from the supervisor, lets the
`Batcher` decide what goes into each request, keeps up to `inflight` requests outstanding,
and blends each response's tiles into the job's accumulators in the arena as it arrives.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import numpy as np

from kiosk_pipeline.config import Settings
from kiosk_pipeline.imaging.tiling import TilePlan, blend_tile, extract_tile, plan_tiles
from kiosk_pipeline.logs import one_line
from kiosk_pipeline.pipeline.arena import Arena
from kiosk_pipeline.pipeline.batcher import Batcher, TileRef
from kiosk_pipeline.pipeline.plan import JobPlan, UnitPlan
from kiosk_pipeline.pipeline.services import Services
from kiosk_pipeline.pipeline.stage import Link, start_child
from kiosk_pipeline.serving import PredictError

log = logging.getLogger(__name__)
BATCH_LIMIT = re.compile(r"larger than maximum input batch size (\d+)")


@dataclass
class _Unit:
    plan: UnitPlan
    tiles: TilePlan
    padded: np.ndarray
    accum: np.ndarray
    remaining: int


@dataclass
class _Job:
    plan: JobPlan
    units: list[_Unit]
    started: float
    remaining: int
    failed: bool = False


@dataclass
class _Request:
    model: Hashable
    refs: list[TileRef]
    sent: float
    future: object = None


@dataclass
class InferenceStats:
    """What the batcher did, for the supervisor's metrics and the benchmark."""

    requests: int = 0
    tiles: int = 0
    busy_seconds: float = 0.0
    fill_sum: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    batch_limit: int = 0
    answered_batch: int = 0


class InferenceLoop:
    def __init__(self, settings: Settings, services: Services, arena: Arena, link: Link) -> None:
        self.settings = settings
        self.services = services
        self.arena = arena
        self.link = link
        self.batcher = Batcher(settings.max_batch, settings.batch_timeout_ms / 1000.0)
        self.events: queue.Queue = queue.Queue()
        self.jobs: dict[str, _Job] = {}
        self.inflight: dict[int, _Request] = {}
        self.next_request = 0
        self.stats = InferenceStats()
        self.busy_since: float | None = None
        self.stopping = False

    # --- inputs ---
    def _read_supervisor(self) -> None:
        while True:
            message = self.link.receive()
            self.events.put(message)
            if message[0] == "stop":
                return

    def _add_job(self, plan: JobPlan) -> None:
        now = time.perf_counter()
        units = []
        for index, unit in enumerate(plan.units):
            accum = self.arena.view(unit.accum)
            accum.fill(0.0)
            tiles = plan_tiles(unit.image_shape, unit.shape.tile_shape, unit.stride_ratio)
            units.append(_Unit(unit, tiles, self.arena.view(unit.padded), accum, tiles.n_tiles))
            self.batcher.add(unit.model, plan.key, index, range(tiles.n_tiles), now)
        self.jobs[plan.key] = _Job(plan, units, now, sum(u.remaining for u in units))

    # --- requests ---
    def _submit(self, model: Hashable, refs: list[TileRef]) -> None:
        first = self.jobs[refs[0][0]].units[refs[0][1]].plan
        tile_x, tile_y = first.shape.tile_shape
        batch = np.empty((len(refs), tile_x, tile_y, first.padded.shape[2]),
                         dtype=np.dtype(first.shape.dtype))
        for slot, (job, unit, tile) in enumerate(refs):
            state = self.jobs[job].units[unit]
            extract_tile(state.padded, state.tiles, tile, out=batch[slot])
        request_id = self.next_request
        self.next_request += 1
        request = _Request(model, refs, time.perf_counter())
        request.future = self.services.predict.predict_future(
            first.model.name, first.model.version, {first.shape.input_name: batch},
            timeout=self.settings.grpc_timeout)
        request.future.add_done_callback(lambda _f: self.events.put(("response", request_id)))
        self.inflight[request_id] = request
        if self.busy_since is None:
            self.busy_since = request.sent
        self.stats.requests += 1
        self.stats.tiles += len(refs)
        self.stats.fill_sum += len(refs) / self.batcher.limit(model)
        self.stats.batch_sizes[len(refs)] = self.stats.batch_sizes.get(len(refs), 0) + 1

    def _dispatch(self) -> None:
        while len(self.inflight) < self.settings.inflight:
            model, refs = self.batcher.next_batch(time.perf_counter(),
                                                  partial=not self.inflight)
            if not refs:
                return
            self._submit(model, refs)

    # --- responses ---
    def _account_busy(self) -> None:
        """Add the time requests have been in flight since the last count."""
        if self.busy_since is not None:
            now = time.perf_counter()
            self.stats.busy_seconds += now - self.busy_since
            self.busy_since = now if self.inflight else None

    def _finish_request(self, request_id: int) -> None:
        request = self.inflight.pop(request_id)
        if not self.inflight:
            self._account_busy()
        live = [ref for ref in request.refs if ref[0] in self.jobs and not self.jobs[ref[0]].failed]
        try:
            outputs = request.future.result()
        except PredictError as error:
            self._request_failed(request, live, error)
            return
        if len(request.refs) > self.stats.answered_batch:
            self.stats.answered_batch = len(request.refs)
            self._send_stats()
        names = sorted(outputs)
        for slot, (job_key, unit_index, tile) in enumerate(request.refs):
            job = self.jobs.get(job_key)
            if job is None or job.failed:
                continue
            unit = job.units[unit_index]
            heads = np.empty((*unit.plan.shape.tile_shape, len(unit.plan.heads)), np.float32)
            for channel, (head, head_channel) in enumerate(unit.plan.heads):
                heads[..., channel] = outputs[names[head]][slot, ..., head_channel]
            blend_tile(unit.accum, heads, unit.tiles, tile)
            unit.remaining -= 1
            job.remaining -= 1
            if job.remaining == 0:
                self._job_done(job)

    def _request_failed(self, request: _Request, live: list[TileRef], error: PredictError) -> None:
        limit = BATCH_LIMIT.search(str(error))
        if limit and int(limit.group(1)) < len(request.refs):
            self.batcher.set_limit(request.model, int(limit.group(1)))
            self.batcher.requeue(request.model, live, time.perf_counter())
            self._send_stats()
            log.warning("model server accepts at most %s tiles per request; batching fewer",
                        limit.group(1))
            return
        for job_key in {ref[0] for ref in live}:
            self._job_failed(self.jobs[job_key], one_line(error))

    def _job_done(self, job: _Job) -> None:
        del self.jobs[job.plan.key]
        elapsed = time.perf_counter() - job.started
        self.link.send("predicted", job.plan.key, elapsed, 0.0)

    def _job_failed(self, job: _Job, reason: str) -> None:
        job.failed = True
        self.batcher.drop(job.plan.key)
        del self.jobs[job.plan.key]
        self.link.send("failed", job.plan.key, reason, 0.0)

    # --- loop ---
    def run(self) -> None:
        threading.Thread(target=self._read_supervisor, daemon=True).start()
        while not (self.stopping and not self.inflight):
            wait = self.batcher.wait_time(time.perf_counter(), partial=not self.inflight)
            if len(self.inflight) >= self.settings.inflight or wait is None:
                wait = 1.0
            try:
                event = self.events.get(timeout=max(wait, 0.0005))
            except queue.Empty:
                event = None
            while event is not None:
                self._handle(event)
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    event = None
            if not self.stopping:
                self._dispatch()
        self._send_stats()

    def _send_stats(self) -> None:
        self._account_busy()
        self.stats.batch_limit = self.batcher.smallest_limit()
        self.link.send("stats", self.stats)

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "response":
            self._finish_request(event[1])
        elif kind == "infer":
            self._add_job(event[1])
        elif kind == "cancel":
            job = self.jobs.pop(event[1], None)
            if job is not None:
                job.failed = True
                self.batcher.drop(event[1])
        elif kind == "stats":
            self._send_stats()
        elif kind == "stop":
            self.stopping = True


def run_inference(conn: Connection, arena_name: str, settings: Settings, name: str) -> None:
    start_child(name, settings)
    arena = Arena.attach(arena_name)
    InferenceLoop(settings, Services(settings), arena, Link(conn)).run()
    arena.close()
