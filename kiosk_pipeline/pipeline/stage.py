"""What every stage process shares: start-up, the pipe to the supervisor, busy accounting."""

from __future__ import annotations

import ctypes
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from kiosk_pipeline.config import Settings
from kiosk_pipeline.imaging.errors import ImageError
from kiosk_pipeline.logs import configure_logging, job_context, one_line
from kiosk_pipeline.storage.base import StorageError
from kiosk_pipeline.workflows.base import JobError

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
M_ARENA_MAX = -8
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    """How to start one stage process; `target(conn, arena_name, settings, name)`."""

    kind: str
    name: str
    target: Callable[[Connection, str, Settings, str], None]


def start_child(name: str, settings: Settings) -> None:
    """Die with the supervisor, and leave SIGTERM/SIGINT to it: it drains and then stops us.

    The process is named `kp-{stage}` (as `ps -o comm` shows it) so operators and the fault
    tests can tell the stages apart.

    All threads share one malloc arena: gRPC's threads allocate response buffers that the
    main thread frees, and with an arena per thread each kept its own high-water mark.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_NAME, f"kp-{name}".encode()[:15])
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        log.debug("glibc unavailable; children rely on the supervisor's pipe closing")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log_level, name)


class Link:
    """The child's end of its pipe to the supervisor."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def receive(self) -> tuple[Any, ...]:
        """The next message; a closed pipe (the supervisor is gone) means stop."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return ("stop",)

    def send(self, *message: Any) -> None:
        self.conn.send(message)

    def allocate(self, key: str, nbytes: int) -> int:
        """Block until the supervisor grants `nbytes` of arena for this job."""
        self.send("alloc", key, nbytes)
        reply = self.conn.recv()
        if reply[0] != "alloc_ok":
            raise MemoryError(reply[1])
        return reply[1]

    def free(self, key: str, offset: int) -> None:
        self.send("free", key, offset)

    def predict(self, key: str, plan: object) -> None:
        """Have the inference stage predict `plan`'s units into the arena; block until done."""
        self.send("predict", key, plan)
        reply = self.conn.recv()
        if reply[0] != "predict_ok":
            raise JobError(reply[1])


def serve_tasks(link: Link, handle: Callable[[Any], tuple[str, object]], doing: str) -> None:
    """Run `handle(task) -> (reply kind, result)` on each task until told to stop.

    A job that cannot succeed is reported as failed with a one-line reason; an unexpected
    error is logged with its traceback and reported without it. Either way the process lives
    on for the next job.
    """
    while True:
        message = link.receive()
        if message[0] == "stop":
            return
        task = message[1]
        clock = BusyClock()
        with job_context(task.key):
            try:
                kind, result = handle(task)
            except (JobError, ImageError, StorageError, MemoryError) as error:
                log.info("job failed while %s: %s", doing, one_line(error))
                link.send("failed", task.key, one_line(error), clock.lap())
            except Exception as error:
                log.exception("unexpected error while %s", doing)
                link.send("failed", task.key,
                          f"internal error while {doing}: {one_line(error)}", clock.lap())
            else:
                link.send(kind, task.key, result, clock.lap())


class BusyClock:
    """Seconds spent working, reported to the supervisor with each result."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.started = now - self.started, now
        return elapsed
