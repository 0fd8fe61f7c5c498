"""Peak memory of a worker with 10 jobs queued vs 10,000 queued, side by side in one run.

Intake only claims what the arena and the stage pools can use now, so a deep queue must cost
no memory: unclaimed jobs stay in Redis. Memory is the summed PSS of the worker's process tree
(supervisor + stage processes; PSS counts the shared arena once), sampled every 0.1 s from the
worker's start until the first N jobs submitted are done.

* cold start: 10 jobs in all vs 10,000 queued, until the first 10 are done. The gate claims
  for batches only as large as the server has answered, so a deep queue does not over-claim
  while the worker starts.
* held: a frontend keeps the queue at 10 jobs, topping it up as the worker claims, or at
  10,000, until the first 150 are done: the same stream of work at working depth; only the
  queue depth differs.

Exits 1 unless both ratios are within 10%.

    python benchmarks/queue_depth_memory.py [--jobs 150]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiosk_pipeline.bench.probe import memory_mb, process_tree
from kiosk_pipeline.imaging.synthetic import make_cells
from kiosk_pipeline.storage import open_storage
from kiosk_pipeline.submit import submit_job
from tests.fixtures.pipeline import Frontend, ModelServer, Worker
from tests.fixtures.redis_server import RedisServer

QUEUE = "segmentation"
SHORT, DEEP = 10, 10_000


def tree_pss_mb(root: int) -> float:
    """Summed PSS of `root` and its descendants, in MiB."""
    return sum(memory_mb(pid) for pid in process_tree(root))


def run(name: str, depth: int, jobs: int, held: bool, workdir: Path, server: ModelServer,
        data: bytes) -> float:
    """Peak PSS in MiB until the first `jobs` jobs are done."""
    (workdir / f"redis-{name}").mkdir()
    redis = RedisServer(workdir / f"redis-{name}")
    redis.start()
    bucket = workdir / f"bucket-{name}"
    client = redis.client()
    first = submit_job(client, open_storage(f"file://{bucket}"), QUEUE, data, "cells.tif")
    frontend = Frontend(client, QUEUE, first)
    frontend.push(depth - 1)
    worker = Worker(redis, server, bucket, workdir / f"worker-{name}.log",
                    LOG_LEVEL="WARNING", FETCH_WORKERS="1", POST_WORKERS="1")
    worker.start()
    peak, stop = 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.1):
            peak = max(peak, tree_pss_mb(worker.process.pid))

    threads = [threading.Thread(target=sample)]
    if held:
        threads.append(threading.Thread(target=frontend.hold, args=(depth, stop)))
    for thread in threads:
        thread.start()
    started = time.monotonic()
    while frontend.done(jobs) < jobs and time.monotonic() - started < 600:
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join()
    worker.stop()
    redis.stop()
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=150,
                        help="jobs done per held run (default 150)")
    args = parser.parse_args()
    image, _ = make_cells((512, 512), n_cells=60, seed=0)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image[..., 0])
    server = ModelServer("--fixed-ms", "5", "--per-tile-ms", "2")
    server.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label, held, jobs in (("cold start", False, SHORT), ("held", True, args.jobs)):
                short, deep = (run(f"{label}-{depth}".replace(" ", "-"), depth, jobs, held,
                                   Path(tmp), server, buffer.getvalue())
                               for depth in (SHORT, DEEP))
                rows.append((label, jobs, short, deep))
    finally:
        server.stop()
    for label, jobs, short, deep in rows:
        print(f"{label}: first {jobs} jobs done: peak PSS {short:.0f} MiB with {SHORT} queued, "
              f"{deep:.0f} MiB with {DEEP:,} queued: ratio {deep / short:.3f}")
    return 0 if all(abs(deep / short - 1) <= 0.10 for _, _, short, deep in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
