"""Soak: a real `kiosk-pipeline consume` at full load for a long time; memory must stay flat and
Redis must hold no more keys than the configured expiry explains.

    python benchmarks/soak.py                          # the documented 30-minute soak
    python benchmarks/soak.py --minutes 3 --expire 30  # a short check that it works

It starts a private redis-server, `kiosk-pipeline serve` and a file:// bucket (as
`kiosk-pipeline bench` does), keeps the queue topped up with Kiosk-shaped jobs so the worker
never idles, deletes each finished job's files (a soak must not fill the disk; the frontend
would keep them), and samples every few seconds: the worker's memory (PSS of the supervisor and
its stage processes, so the shared-memory arena counts once), Redis's key count and memory, and
jobs done/failed. At the end it stops feeding, waits for the backlog, drains the worker with
SIGTERM and checks:

- memory: the median of the last quarter is within --rss-slack (default 10%) of the median of
  the second quarter (the first quarter is warm-up: numba, caches, arena touched);
- Redis keys: once EXPIRE_TIME has passed, the key count never exceeds what the expiry explains
  (the jobs finished within the last EXPIRE_TIME, plus the backlog, plus jobs in flight, plus a
  few fixed keys), with 10% slack; finished job hashes carry a TTL;
- jobs: none failed, none lost, the worker exited 0.

Exit status 0 when every check passes. Not run in CI; see docs/operations.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kiosk_pipeline.bench.environment import Environment, ServerSpec  # noqa: E402
from kiosk_pipeline.bench.probe import memory_mb, process_tree  # noqa: E402
from kiosk_pipeline.imaging.synthetic import make_cells  # noqa: E402
from kiosk_pipeline.storage import open_storage  # noqa: E402
from kiosk_pipeline.storage.base import Storage  # noqa: E402
from kiosk_pipeline.submit import submit_job  # noqa: E402

QUEUE = "segmentation"
#: Keys that are not job hashes: heartbeats, the worker registry, cached model metadata.
FIXED_KEYS = 20
#: Jobs one worker holds at most (MAX_JOBS_IN_FLIGHT's default).
IN_FLIGHT = 64


@dataclass
class Sample:
    at: float
    pss_mb: float
    processes: int
    redis_keys: int
    redis_mb: float
    queued: int
    done: int
    failed: int


def tiff(seed: int, size: int) -> bytes:
    image, _ = make_cells((size, size), n_cells=size // 12, seed=seed)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image[..., 0])
    return buffer.getvalue()


def worker_pss_mb(pid: int) -> tuple[float, int]:
    """Proportional set size of `pid` and its descendants, MiB, and how many processes."""
    pids = process_tree(pid)
    return sum(memory_mb(each) for each in pids), len(pids)


class Feeder:
    """Submits jobs as the frontend does and cleans up after the finished ones."""

    def __init__(self, client: redis.Redis, storage: Storage, images: list[bytes]) -> None:
        self.client = client
        self.storage = storage
        self.images = images
        self.pending: dict[str, str] = {}
        self.done = 0
        self.failed = 0
        self.reasons: list[str] = []
        self.submitted = 0
        self.immortal: list[str] = []

    def top_up(self, backlog: int) -> None:
        while self.client.llen(QUEUE) < backlog:
            data = self.images[self.submitted % len(self.images)]
            key = submit_job(self.client, self.storage, QUEUE, data, f"soak{self.submitted}.tif")
            self.pending[key] = self.client.hget(key, "input_file_name") or ""
            self.submitted += 1

    def collect(self) -> None:
        """Count finished jobs and delete their upload and output, as a janitor of the bucket."""
        keys = list(self.pending)
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, "status", "output_file_name", "reason")
            states = pipe.execute()
        for key, (status, output, reason) in zip(keys, states, strict=True):
            if status not in ("done", "failed"):
                continue
            if status == "done":
                self.done += 1
            else:
                self.failed += 1
                self.reasons.append(reason or "")
            for name in (self.pending.pop(key), output):
                if name:
                    (Path(self.storage.url.removeprefix("file://")) / name).unlink(
                        missing_ok=True)


def run(args: argparse.Namespace) -> int:
    spec = ServerSpec(fixed_ms=args.fixed_ms, per_tile_ms=args.per_tile_ms, max_batch=32)
    images = [tiff(seed, args.size) for seed in range(8)]
    with Environment(spec) as env:
        client = env.client()
        storage = open_storage(env.storage_url or "")
        host, _, port = (env.tf_target or "").rpartition(":")
        log_path = env.workdir / "worker.log"
        worker_env = {**os.environ, "REDIS_URL": env.redis_url or "", "TF_HOST": host,
                      "TF_PORT": port, "STORAGE_BUCKET": env.storage_url or "",
                      "QUEUE": QUEUE, "CONSUMER_TYPE": "segmentation",
                      "HOSTNAME": "soak-worker", "EXPIRE_TIME": str(args.expire),
                      "LOG_LEVEL": "WARNING", "TF_MAX_BATCH_SIZE": "32"}
        with log_path.open("wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "kiosk_pipeline", "consume"],
                                      env=worker_env, stdout=log, stderr=log)
            try:
                samples, feeder = soak(args, client, storage, images, worker.pid)
            finally:
                if worker.poll() is None:
                    worker.terminate()
                code = worker.wait(120)
        tail = log_path.read_text(errors="replace")[-3000:]
    return report(args, samples, feeder, code, tail)


def soak(args: argparse.Namespace, client: redis.Redis, storage: Storage, images: list[bytes],
         pid: int) -> tuple[list[Sample], Feeder]:
    feeder = Feeder(client, storage, images)
    samples: list[Sample] = []
    started = time.monotonic()
    end = started + args.minutes * 60
    next_sample = started
    while time.monotonic() < end:
        feeder.top_up(args.backlog)
        feeder.collect()
        if time.monotonic() >= next_sample:
            pss, processes = worker_pss_mb(pid)
            info = client.info("memory")
            samples.append(Sample(time.monotonic() - started, pss, processes, client.dbsize(),
                                  info["used_memory"] / 2**20, client.llen(QUEUE),
                                  feeder.done, feeder.failed))
            last = samples[-1]
            print(f"{last.at:7.0f} s  pss {last.pss_mb:7.1f} MiB ({last.processes} procs)  "
                  f"redis {last.redis_keys:6d} keys {last.redis_mb:6.1f} MiB  "
                  f"queued {last.queued:4d}  done {last.done:6d}  failed {last.failed}",
                  flush=True)
            next_sample += args.every
        time.sleep(0.2)
    drain = time.monotonic() + 300
    while feeder.pending and time.monotonic() < drain:
        feeder.collect()
        time.sleep(0.5)
    feeder.immortal = [key for key in client.scan_iter(f"{QUEUE}:*", count=1000)
                       if client.ttl(key) == -1]
    return samples, feeder


def report(args: argparse.Namespace, samples: list[Sample], feeder: Feeder, code: int,
           tail: str) -> int:
    checks: dict[str, tuple[bool, str]] = {}
    quarter = max(1, len(samples) // 4)
    early = statistics.median(s.pss_mb for s in samples[quarter:2 * quarter] or samples)
    late = statistics.median(s.pss_mb for s in samples[-quarter:])
    checks["memory flat"] = (late <= early * (1 + args.rss_slack),
                             f"median PSS {early:.0f} MiB in the 2nd quarter, {late:.0f} MiB in "
                             f"the last (allowed +{args.rss_slack:.0%})")
    elapsed = samples[-1].at - samples[0].at if len(samples) > 1 else 1.0
    rate = (samples[-1].done + samples[-1].failed) / max(elapsed, 1.0)
    excess = []
    for sample in samples:
        if sample.at < args.expire + args.every:
            continue
        earlier = [s for s in samples if s.at <= sample.at - args.expire - args.every]
        recent = sample.done + sample.failed - (earlier[-1].done + earlier[-1].failed)
        explained = 1.1 * (recent + args.backlog + IN_FLIGHT + FIXED_KEYS)
        excess.append((sample.redis_keys - explained, sample, explained))
    worst = max(excess, key=lambda item: item[0], default=None)
    checks["redis keys bounded by expiry"] = (
        worst is not None and worst[0] <= 0,
        f"worst at {worst[1].at:.0f} s: {worst[1].redis_keys} keys; the jobs finished in the "
        f"last EXPIRE_TIME ({args.expire} s) + backlog + in flight explain {worst[2]:.0f}"
        if worst else f"the run was shorter than EXPIRE_TIME ({args.expire} s)")
    checks["no job failed"] = (feeder.failed == 0, "; ".join(sorted(set(feeder.reasons))[:3])
                               or f"{feeder.done} done")
    checks["finished jobs expire"] = (not feeder.immortal,
                                      f"{len(feeder.immortal)} job hashes without a TTL")
    checks["no job lost"] = (not feeder.pending, f"{len(feeder.pending)} unfinished")
    checks["worker drained, exit 0"] = (code == 0, f"exit code {code}")
    summary = {"minutes": args.minutes, "jobs_done": feeder.done, "jobs_failed": feeder.failed,
               "jobs_per_s": round(rate, 2),
               "checks": {name: {"ok": ok, "detail": detail}
                          for name, (ok, detail) in checks.items()},
               "samples": [asdict(s) for s in samples]}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print()
    for name, (ok, detail) in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    passed = all(ok for ok, _ in checks.values())
    if not passed:
        print("\nworker log (tail):\n" + tail)
    return 0 if passed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="soak length")
    parser.add_argument("--expire", type=int, default=300,
                        help="EXPIRE_TIME of finished job hashes, seconds")
    parser.add_argument("--backlog", type=int, default=64, help="jobs kept waiting in Redis")
    parser.add_argument("--size", type=int, default=512, help="image side, pixels")
    parser.add_argument("--every", type=float, default=10.0, help="sampling period, seconds")
    parser.add_argument("--rss-slack", type=float, default=0.10,
                        help="allowed growth of the worker's memory")
    parser.add_argument("--fixed-ms", type=float, default=20.0, help="simulated GPU, per batch")
    parser.add_argument("--per-tile-ms", type=float, default=2.0, help="simulated GPU, per tile")
    parser.add_argument("--json", type=Path, help="write the samples and checks here")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
