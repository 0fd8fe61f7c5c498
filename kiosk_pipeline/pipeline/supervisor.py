"""The supervisor: owns the arena and the ledger of jobs in flight, runs the stage processes.

Every descriptor passes through here, so this process always knows which stage holds which
job and which arena block it uses. When a stage process dies, even by SIGKILL, it is restarted
and the jobs it held resume from their last durable point (the arena is ours, so fetched images
and blended predictions survive); after `max_attempts` a job fails with a reason. SIGTERM stops
intake, lets jobs in flight finish until `drain_timeout`, returns the rest to the queue and
exits 0.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import redis

from kiosk_pipeline.config import Settings
from kiosk_pipeline.jobs import PARKED, Job
from kiosk_pipeline.logs import job_context
from kiosk_pipeline.pipeline.arena import Allocator, Arena, ArenaFull
from kiosk_pipeline.pipeline.fetch import run_fetch
from kiosk_pipeline.pipeline.inference import InferenceStats, run_inference
from kiosk_pipeline.pipeline.metrics import PipelineMetrics
from kiosk_pipeline.pipeline.plan import JobPlan, Ticket
from kiosk_pipeline.pipeline.post import run_post
from kiosk_pipeline.pipeline.publish import run_publish
from kiosk_pipeline.pipeline.services import Services
from kiosk_pipeline.pipeline.stage import StageSpec
from kiosk_pipeline.workflows.registry import worker_settings

log = logging.getLogger(__name__)
STAGES = ("fetch", "inference", "post", "publish")
RESTART_PAUSE = 1.0
REPORT_EVERY = 10.0
#: Arena memory idle above the highest live job that is worth giving back to the OS: a burst
#: of large images leaves this much, steady small jobs do not.
TRIM_SLACK = 128 << 20


@dataclass
class Entry:
    """One job in flight, as the ledger knows it."""

    ticket: Ticket
    state: str = "queued-fetch"
    plan: JobPlan | None = None
    allocations: list[int] = field(default_factory=list)
    consumer: StageProcess | None = None
    consumer_plan: JobPlan | None = None
    outputs: list[tuple[str, bytes]] = field(default_factory=list)
    attempts: int = 1
    claimed: float = field(default_factory=time.perf_counter)


class StageProcess:
    """A stage process and the jobs it holds; restarted in place when it dies."""

    def __init__(self, spec: StageSpec, arena_name: str, settings: Settings) -> None:
        self.spec = spec
        self.arena_name = arena_name
        self.settings = settings
        self.holding: set[str] = set()
        self.restarts = 0
        self.started_at = 0.0
        self.conn: Connection
        self.process: mp.process.BaseProcess
        self.start()

    @property
    def kind(self) -> str:
        return self.spec.kind

    def start(self) -> None:
        parent, child = mp.get_context("spawn").Pipe()
        self.conn = parent
        self.process = mp.get_context("spawn").Process(
            target=self.spec.target, name=self.spec.name,
            args=(child, self.arena_name, self.settings, self.spec.name), daemon=True)
        self.process.start()
        child.close()
        self.started_at = time.monotonic()

    def send(self, *message: object) -> bool:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):
            return False
        return True

    def stop(self, timeout: float) -> None:
        self.send("stop")
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings = worker_settings(settings)
        self.services = Services(settings)
        self.ledger: dict[str, Entry] = {}
        self.fetch_queue: deque[str] = deque()
        self.post_queue: deque[str] = deque()
        self.waiters: deque[tuple[StageProcess, str, int]] = deque()
        self.allocator = Allocator(settings.arena_mb << 20)
        self.processes: list[StageProcess] = []
        self.metrics = PipelineMetrics()
        self.inference_stats = InferenceStats()
        self.stopping = threading.Event()
        self.gate = threading.Event()
        self.drain_deadline = float("inf")
        self.arena: Arena | None = None
        self._intake_reader, self._intake_writer = mp.Pipe(duplex=False)

    # --- lifecycle ---
    def request_stop(self, *_: object) -> None:
        if not self.stopping.is_set():
            log.info("stopping: intake closed, draining jobs in flight for up to %.0f s",
                     self.settings.drain_timeout)
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout
            self.stopping.set()
            self.gate.clear()

    def _specs(self) -> list[StageSpec]:
        s = self.settings
        specs = [StageSpec("fetch", f"fetch-{i}", run_fetch) for i in range(s.fetch_workers)]
        specs.append(StageSpec("inference", "inference", run_inference))
        specs += [StageSpec("post", f"post-{i}", run_post) for i in range(s.post_workers)]
        specs.append(StageSpec("publish", "publish", run_publish))
        return specs

    def run(self, until: Callable[[Supervisor], bool] | None = None,
            install_signals: bool = True) -> int:
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        jobs = self.services.jobs
        jobs.register()
        self.arena = Arena.create(self.settings.arena_mb << 20)
        maintenance = threading.Thread(target=jobs.run_maintenance, args=(self.stopping,),
                                       name="maintenance", daemon=True)
        maintenance.start()
        if self.settings.metrics_port is not None:
            self.metrics.serve(self.settings.metrics_port)
        try:
            self.processes = [StageProcess(spec, self.arena.name, self.settings)
                              for spec in self._specs()]
            threading.Thread(target=self._intake, name="intake", daemon=True).start()
            threading.Thread(target=self._reconcile, name="reconcile", daemon=True).start()
            self._loop(until)
        finally:
            self._shutdown()
        return 0

    def _loop(self, until: Callable[[Supervisor], bool] | None) -> None:
        next_stats = next_report = time.monotonic()
        while True:
            waitables = [self._intake_reader]
            for proc in self.processes:
                waitables += [proc.conn, proc.process.sentinel]
            for ready in wait(waitables, timeout=0.2):
                if ready is self._intake_reader:
                    self._on_claimed(self._intake_reader.recv())
                    continue
                for proc in self.processes:
                    if ready is proc.conn:
                        self._receive(proc)
            for proc in self.processes:
                if not proc.process.is_alive():
                    self._on_death(proc)
            self._dispatch()
            now = time.monotonic()
            if now >= next_stats:
                self._inference().send("stats")
                self.metrics.sample(self)
                self._trim_arena()
                next_stats = now + 1.0
            if now >= next_report:
                self._report()
                next_report = now + REPORT_EVERY
            if until is not None and not self.stopping.is_set() and until(self):
                self.request_stop()
            if self.stopping.is_set():
                self._drop_unstarted()
                if not self.ledger or now >= self.drain_deadline:
                    return
            else:
                self._update_gate()

    def _trim_arena(self) -> None:
        span = self.allocator.take_idle_span(TRIM_SLACK)
        if span is not None and self.arena is not None:
            self.arena.release(*span)

    def _report(self) -> None:
        """One line on where the jobs in flight are, for operators reading the log."""
        states: dict[str, int] = {}
        for entry in self.ledger.values():
            states[entry.state] = states.get(entry.state, 0) + 1
        stats = self.inference_stats
        fill = stats.fill_sum / stats.requests if stats.requests else 0.0
        log.info("in flight %d %s; finished %s; %d tiles in %d requests (fill %.2f)",
                 len(self.ledger), dict(sorted(states.items())), self.metrics.outcomes,
                 stats.tiles, stats.requests, fill)

    def _shutdown(self) -> None:
        self.stopping.set()
        self.gate.clear()
        for proc in self.processes:
            proc.stop(timeout=5.0)
        self._receive_leftovers()
        for key in list(self.ledger):
            with job_context(key):
                log.info("returning unfinished job to the queue")
                self.services.jobs.put_back(key)
            del self.ledger[key]
        self.services.jobs.deregister()
        if self.arena is not None:
            self.arena.close()

    def _receive_leftovers(self) -> None:
        while self._intake_reader.poll():
            job: Job = self._intake_reader.recv()
            self.ledger.setdefault(job.key, Entry(Ticket(job.key, job.fields, time.time())))

    # --- intake ---
    def _intake(self) -> None:
        """One claim per opening of the gate: the supervisor reopens it once it has counted
        the job, so a burst of claims cannot outrun its accounting."""
        timeout = min(self.settings.empty_queue_timeout, 1.0)
        while not self.stopping.is_set():
            if not self.gate.wait(timeout=0.5):
                continue
            job = self.services.jobs.claim(timeout=timeout)
            if job is not None:
                self.gate.clear()
                self._intake_writer.send(job)

    def _reconcile(self) -> None:
        """Return jobs our processing list holds but no stage does, once seen twice in a row.

        Redis replicates asynchronously: a Sentinel failover can drop a job's final write but
        keep our claim, and the job would then sit in a live worker's list, where no one
        recovers it. Two sightings an interval apart rule out a claim on its way to the ledger.
        """
        jobs = self.services.jobs
        suspects: set[str] = set()
        while not self.stopping.wait(2 * self.settings.heartbeat_interval):
            try:
                held = set(jobs.client.lrange(jobs.processing, 0, -1))
            except redis.RedisError:
                continue
            stranded = held - set(self.ledger.copy())
            for key in sorted(stranded & suspects):
                with job_context(key):
                    log.warning("our processing list holds this job but no stage does (its "
                                "final write lost in a Redis failover?); returning it to the "
                                "queue")
                    jobs.put_back(key)
            suspects = stranded

    def _idle(self, kind: str) -> list[StageProcess]:
        return [p for p in self.processes if p.kind == kind and not p.holding]

    def _update_gate(self) -> None:
        """Claim only what the stages can use now: a job claimed early just waits (and holds
        memory) here instead of in Redis, where another pod could take it. The batcher needs
        its requests in flight plus two full batches waiting to keep the server busy.

        TF_MAX_BATCH_SIZE may overstate what the server accepts (the Kiosk's default 64 against
        its server's 32), so a batch counts only as large as the server has answered so far,
        starting from one full batch in all (a slow start): claiming for batches the server
        will reject would only hold memory."""
        s = self.settings
        stats = self.inference_stats
        inference_tiles = sum(e.plan.tiles for e in self.ledger.values()
                              if e.state == "inference" and e.plan is not None)
        limit = stats.batch_limit or s.max_batch
        batch = min(limit, max(stats.answered_batch, -(-limit // (s.inflight + 2))))
        room = (len(self.ledger) < s.max_jobs_in_flight
                and len(self.fetch_queue) < len(self._idle("fetch"))
                and not self.waiters
                and inference_tiles < (s.inflight + 2) * batch
                and len(self.post_queue) < s.post_workers)
        if room:
            self.gate.set()
        else:
            self.gate.clear()

    def _on_claimed(self, job: Job) -> None:
        with job_context(job.key):
            if job.key in self.ledger:
                jobs = self.services.jobs
                if len(jobs.client.lpos(jobs.processing, job.key, count=0) or []) > 1:
                    log.warning("job key was queued twice; the copy is dropped")
                    jobs.client.lrem(jobs.processing, 1, job.key)
                else:
                    log.warning("job in flight was claimed again: Redis had lost our claim (a "
                                "failover?), so this claim now stands for it")
                return
            self.ledger[job.key] = Entry(Ticket(job.key, job.fields, time.time()))
            self.fetch_queue.append(job.key)
            self.metrics.claimed()

    def _drop_unstarted(self) -> None:
        while self.fetch_queue:
            key = self.fetch_queue.pop()
            self.services.jobs.put_back(key)
            del self.ledger[key]

    # --- dispatch ---
    def _inference(self) -> StageProcess:
        return next(p for p in self.processes if p.kind == "inference")

    def _publisher(self) -> StageProcess:
        return next(p for p in self.processes if p.kind == "publish")

    def _hand(self, proc: StageProcess, key: str, state: str, payload: object,
              kind: str = "task") -> None:
        self.ledger[key].state = state
        proc.holding.add(key)
        proc.send(kind, payload)

    def _dispatch(self) -> None:
        for proc in self._idle("fetch"):
            if not self.fetch_queue:
                break
            key = self.fetch_queue.popleft()
            entry = self.ledger[key]
            self._hand(proc, key, "fetch",
                       Ticket(key, entry.ticket.fields, entry.ticket.claimed_at, entry.attempts))
        for proc in self._idle("post"):
            if not self.post_queue:
                break
            key = self.post_queue.popleft()
            self._hand(proc, key, "post", self.ledger[key].plan)

    # --- messages from stages ---
    def _receive(self, proc: StageProcess) -> None:
        try:
            message = proc.conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "alloc":
            self._allocate(proc, message[1], message[2])
            return
        if kind == "free":
            self._free(message[1], message[2])
            return
        if kind == "predict":
            self._consumer_predict(proc, message[1], message[2])
            return
        if kind == "stats":
            self.inference_stats = message[1]
            self.metrics.inference_reported(message[1])
            return
        key, result, busy = message[1], message[2], message[3]
        proc.holding.discard(key)
        self.metrics.busy(proc.kind, busy)
        entry = self.ledger.get(key)
        if entry is None:
            return
        with job_context(key):
            if entry.consumer is not None and proc.kind == "inference":
                self._consumer_predicted(entry, kind, result)
            elif kind == "failed":
                self._fail(key, result)
            elif kind == "consumed":
                self._consumed(key, result)
            elif kind == "fetched":
                entry.plan = result
                self._hand(self._inference(), key, "inference", result, "infer")
            elif kind == "predicted":
                entry.plan.timings["prediction_time"] = result
                entry.state = "queued-post"
                self.post_queue.append(key)
            elif kind == "postprocessed":
                entry.plan.timings["postprocess_time"], entry.outputs = result
                self._free_all(entry)
                self._hand(self._publisher(), key, "publish", (entry.plan, entry.outputs))
            elif kind == "published":
                self.metrics.finished("done" if result else "recovered-elsewhere",
                                      time.perf_counter() - entry.claimed)
                self._release(key)

    def _allocate(self, proc: StageProcess, key: str, nbytes: int) -> None:
        try:
            offset = self.allocator.allocate(nbytes)
        except ArenaFull:
            proc.send("alloc_fail", f"the image needs {nbytes / 2**20:.0f} MiB of working "
                      f"memory, more than the {self.settings.arena_mb} MiB arena (ARENA_MB)")
            return
        if offset is None:
            self.waiters.append((proc, key, nbytes))
            return
        self.ledger[key].allocations.append(offset)
        proc.send("alloc_ok", offset)

    def _serve_waiters(self) -> None:
        while self.waiters:
            proc, key, nbytes = self.waiters[0]
            offset = self.allocator.allocate(nbytes)
            if offset is None:
                return
            self.waiters.popleft()
            self.ledger[key].allocations.append(offset)
            proc.send("alloc_ok", offset)

    def _free(self, key: str, offset: int) -> None:
        entry = self.ledger.get(key)
        if entry is not None and offset in entry.allocations:
            entry.allocations.remove(offset)
            self.allocator.free(offset)
            self._serve_waiters()

    def _free_all(self, entry: Entry) -> None:
        for offset in entry.allocations:
            self.allocator.free(offset)
        entry.allocations.clear()
        self._serve_waiters()

    def _release(self, key: str) -> None:
        self._free_all(self.ledger.pop(key))

    # --- seed-style consumers: their grpc_image goes through the shared batcher ---
    def _consumer_predict(self, proc: StageProcess, key: str, plan: JobPlan) -> None:
        entry = self.ledger[key]
        entry.consumer, entry.consumer_plan = proc, plan
        inference = self._inference()
        inference.holding.add(key)
        inference.send("infer", plan)

    def _consumer_predicted(self, entry: Entry, kind: str, result: object) -> None:
        consumer, entry.consumer = entry.consumer, None
        if kind == "predicted":
            consumer.send("predict_ok", result)
        else:
            consumer.send("predict_fail", result)

    def _consumed(self, key: str, status: str) -> None:
        """The consumer's `_consume` returned: finish, fail or put back as the seed did."""
        jobs = self.services.jobs
        if status == "done":
            jobs.finish(key, {})
            self.metrics.finished("done", time.perf_counter() - self.ledger[key].claimed)
        elif status == "failed":
            reason = jobs.client.hget(key, "reason") or "the consumer reported a failure"
            jobs.fail(key, reason)
            self.metrics.finished("failed", time.perf_counter() - self.ledger[key].claimed)
        elif status == PARKED:
            jobs.park(key)
        else:
            jobs.put_back(key)
        self._release(key)

    def _fail(self, key: str, reason: str) -> None:
        entry = self.ledger[key]
        inference = self._inference()
        if key in inference.holding:
            inference.holding.discard(key)
            inference.send("cancel", key)
        self.services.jobs.fail(key, reason)
        self.metrics.finished("failed", time.perf_counter() - entry.claimed)
        self._release(key)

    # --- supervision ---
    def _on_death(self, proc: StageProcess) -> None:
        code = proc.process.exitcode
        log.error("%s process died (exit code %s); restarting it", proc.spec.name, code)
        held = sorted(proc.holding)
        proc.holding.clear()
        self.waiters = deque(w for w in self.waiters if w[0] is not proc)
        if time.monotonic() - proc.started_at < RESTART_PAUSE:
            time.sleep(RESTART_PAUSE)
        proc.restarts += 1
        self.metrics.restarted(proc.kind)
        proc.start()
        for key in held:
            self._retry(key, proc.kind, f"the {proc.kind} process died (exit code {code})")

    def _retry(self, key: str, stage: str, why: str) -> None:
        entry = self.ledger.get(key)
        if entry is None:
            return
        with job_context(key):
            entry.attempts += 1
            if entry.attempts > self.settings.max_attempts:
                self._fail(key, f"gave up after {self.settings.max_attempts} attempts: {why}")
                return
            log.warning("retrying (attempt %d): %s", entry.attempts, why)
            if entry.consumer is not None and stage == "inference":
                self._hand(self._inference(), key, "fetch", entry.consumer_plan, "infer")
            elif entry.state == "fetch":
                inference = self._inference()
                if entry.consumer is not None and key in inference.holding:
                    inference.holding.discard(key)
                    inference.send("cancel", key)
                entry.consumer = None
                self._free_all(entry)
                entry.state = "queued-fetch"
                self.fetch_queue.appendleft(key)
            elif entry.state == "inference":
                self._hand(self._inference(), key, "inference", entry.plan, "infer")
            elif entry.state == "post":
                entry.state = "queued-post"
                self.post_queue.appendleft(key)
            elif entry.state == "publish":
                self._hand(self._publisher(), key, "publish", (entry.plan, entry.outputs))
