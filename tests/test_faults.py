"""Faults injected into a real `kiosk-pipeline consume` while it works through a ledger of jobs.

Each scenario submits jobs as the frontend does, injects one fault while they are in flight and
then audits the ledger: every job ends `done` (its archive holds labels that match the synthetic
truth) or `failed` with a reason saying its retry budget ran out; no key is left in the queue or
a processing list; and Redis saw exactly one terminal write per job. Terminal writes are counted
with MONITOR, so a job completed twice shows up even when both writes look alike. The table
printed at the end is the issue's report: fault -> submitted, done, failed, lost, duplicated.

test_supervision.py covers one SIGKILL per stage, SIGTERM draining and a dead worker's jobs
taken over by a worker started afterwards; this file goes further (kills beyond MAX_ATTEMPTS, a
worker restarted under its own name, a live second worker, Redis, the model server, storage).
"""

from __future__ import annotations

import io
import os
import re
import signal
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import tifffile
from redis.backoff import NoBackoff
from redis.retry import Retry

from kiosk_pipeline.imaging.metrics import f1_at_iou
from kiosk_pipeline.imaging.synthetic import make_cells
from kiosk_pipeline.storage import open_storage
from kiosk_pipeline.storage.base import Storage
from kiosk_pipeline.submit import submit_job, wait_for
from tests.fixtures.pipeline import ModelServer, Worker, stage_pids, wait_for_stages
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.storage_emulators import AWS_KEY, AWS_SECRET, FlakyProxy, S3Service
from tests.test_end_to_end import tiff_bytes
from tests.test_redis_connection import SentinelProcess, replicated_redis, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow]

QUEUE = "segmentation"
STAGES = {"fetch-0", "inference", "post-0", "publish"}
IMAGE_SHAPE = (320, 320)
#: A clean run scores 0.81-1.0 on these images; another job's labels or an empty image ~0.
MIN_F1 = 0.75
TERMINAL_WRITE = re.compile(r"(?:^| )status (done|failed)(?: |$)")


@dataclass(frozen=True)
class Row:
    """One line of the report."""

    fault: str
    submitted: int
    done: int
    failed: int
    lost: int
    duplicated: int
    orphaned: int


ROWS: list[Row] = []


@pytest.fixture(scope="module", autouse=True)
def fault_table(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the measured table once the module's scenarios have run."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if not ROWS or reporter is None or capture is None:
        return
    width = max(len(row.fault) for row in ROWS)
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(f"{'fault':<{width}}  submitted  done  failed  lost  duplicated"
                            "  orphaned outputs")
        for row in ROWS:
            reporter.write_line(f"{row.fault:<{width}}  {row.submitted:>9}  {row.done:>4}  "
                                f"{row.failed:>6}  {row.lost:>4}  {row.duplicated:>10}  "
                                f"{row.orphaned:>16}")


class TerminalWrites:
    """How often Redis set each job's status to done or failed, seen through MONITOR.

    The worker's final write is a Lua script, so commands run inside scripts count. Watching a
    replica with `replicated_from` (its master's port) counts what survives a failover: the
    writes replicated from the master before it, the replica's own scripts after it; a write
    the old master took but never replicated is lost, and not counted. Reconnects after a
    restart at once: redis-py's own retries would back off for seconds, and writes in that
    window would go unseen.
    """

    def __init__(self, ports: list[int], replicated_from: int | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self._master_link = str(replicated_from)
        self._stop = threading.Event()
        self._attached = [threading.Event() for _ in ports]
        self._threads = [threading.Thread(target=self._watch, args=(port, attached), daemon=True)
                         for port, attached in zip(ports, self._attached, strict=True)]
        self._lock = threading.Lock()

    def __enter__(self) -> TerminalWrites:
        for thread in self._threads:
            thread.start()
        for attached in self._attached:
            assert attached.wait(10), "MONITOR did not attach"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    def _watch(self, port: int, attached: threading.Event) -> None:
        while not self._stop.is_set():
            client = redis.Redis(port=port, decode_responses=True, socket_timeout=0.5,
                                 socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
            try:
                with client.monitor() as monitor:
                    attached.set()
                    while not self._stop.is_set():
                        self._note(monitor.next_command())
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.01)
            finally:
                client.close()

    def _note(self, command: dict) -> None:
        if command.get("client_type") != "lua" and command.get("client_port") != self._master_link:
            return
        words = command["command"].split(" ", 2)
        if len(words) == 3 and words[0].upper() == "HSET" and TERMINAL_WRITE.search(words[2]):
            with self._lock:
                self.counts[words[1]] += 1


class Ledger:
    """The jobs one scenario submitted, with the truth their outputs must match."""

    def __init__(self, client: redis.Redis, storage: Storage, fault: str) -> None:
        self.client = client
        self.storage = storage
        self.fault = fault
        self.truth: dict[str, np.ndarray] = {}
        self.names: dict[str, str] = {}

    def submit(self, count: int) -> list[str]:
        keys = []
        for _ in range(count):
            seed = len(self.truth)
            image, truth = make_cells(IMAGE_SHAPE, n_cells=20, seed=seed)
            name = f"{self.fault.split()[0].lower()}-{seed}.tif"
            key = submit_job(self.client, self.storage, QUEUE, tiff_bytes(image), name)
            self.truth[key] = truth
            self.names[key] = name.removesuffix(".tif")
            keys.append(key)
        return keys

    def wait_for_status(self, statuses: set[str], count: int = 1, timeout: float = 60) -> None:
        """Until `count` jobs are in one of `statuses` (a fault then hits work in flight)."""
        wait_until(lambda: sum(self.client.hget(k, "status") in statuses
                               for k in self.truth) >= count, timeout, f"jobs in {statuses}")

    def audit(self, writes: TerminalWrites, outputs: Callable[[], list[str]], *,
              timeout: float = 180, budget_reason: str | None = None,
              log: Callable[[], str] = str, redone: bool = False) -> dict[str, dict[str, str]]:
        """Wait for every job, record the table row and check the ledger.

        `budget_reason` is a pattern every failure's reason must match (its retry budget ran
        out); None means the fault was within every budget, so no job may fail. `redone` allows
        archives no job refers to: a job whose final write Redis lost is done again.
        """
        keys = list(self.truth)
        results = wait_for(self.client, keys, timeout=timeout)
        time.sleep(0.5)  # let MONITOR see the last writes
        done = [k for k in keys if results.get(k, {}).get("status") == "done"]
        failed = [k for k in keys if results.get(k, {}).get("status") == "failed"]
        duplicated = [k for k in keys if writes.counts[k] > 1]
        archives = outputs()
        orphaned = set(archives) - {results[k]["output_file_name"] for k in done}
        ROWS.append(Row(self.fault, len(keys), len(done), len(failed),
                        len(keys) - len(done) - len(failed), len(duplicated), len(orphaned)))
        tail = log()[-4000:]
        assert len(done) + len(failed) == len(keys), f"lost: {self._whereabouts(results)}\n{tail}"
        assert not duplicated, f"completed more than once: {duplicated}\n{tail}"
        assert all(writes.counts[k] == 1 for k in keys), f"{writes.counts}\n{tail}"
        reasons = {k: results[k]["reason"] for k in failed}
        if budget_reason is None:
            assert not failed, "\n".join([*reasons.values(), tail])
        for reason in reasons.values():
            assert re.search(budget_reason, reason), f"{reason}\n{tail}"
            assert "\n" not in reason and "Traceback" not in reason
        assert redone or not orphaned, f"outputs of no job: {sorted(orphaned)}"
        self._check_outputs(results, done, archives)
        leftovers = {name: self.client.llen(name)
                     for name in [QUEUE, *self.client.scan_iter(f"processing-{QUEUE}:*")]}
        assert not any(leftovers.values()), leftovers
        return results

    def _whereabouts(self, results: dict[str, dict[str, str]]) -> dict[str, str]:
        """Where each unfinished job is: its status and the lists that hold it."""
        lists = [QUEUE, *self.client.scan_iter(f"processing-{QUEUE}:*")]
        return {key: f"{self.client.hget(key, 'status')} in "
                     f"{[name for name in lists if self.client.lpos(name, key) is not None]}"
                for key in self.truth if key not in results}

    def _check_outputs(self, results: dict[str, dict[str, str]], done: list[str],
                       archives: list[str]) -> None:
        """An archive for every done job, holding labels that match the image's truth."""
        names = {results[k]["output_file_name"] for k in done}
        assert len(names) == len(done) and names <= set(archives)
        for key in done:
            labels = read_zip(self.storage, results[key]["output_file_name"])
            assert list(labels) == [f"{self.names[key]}_batch_0_feature_0.tif"]
            (label,) = labels.values()
            assert f1_at_iou(self.truth[key], label) >= MIN_F1


def read_zip(storage: Storage, key: str) -> dict[str, np.ndarray]:
    """The label images in one output archive, by member name."""
    with zipfile.ZipFile(io.BytesIO(storage.read_bytes(key))) as archive:
        return {name: tifffile.imread(io.BytesIO(archive.read(name)))
                for name in archive.namelist()}


def inject(proxy: FlakyProxy, fault: int | str, count: int) -> None:
    """Make the proxy's next `count` requests fail with `fault`."""
    proxy.fault = fault
    proxy.failures = len(proxy.requests) + count


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie or a reused-but-gone entry counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def local_bucket(tmp_path: Path) -> tuple[Path, Storage, Callable[[], list[str]]]:
    """A file:// bucket, its storage, and a lister of its output archives."""
    bucket = tmp_path / "bucket"
    storage = open_storage(f"file://{bucket}")

    def outputs() -> list[str]:
        return [path.relative_to(bucket).as_posix() for path in (bucket / "output").glob("*.zip")]

    return bucket, storage, outputs


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Workers a scenario starts; any still running when it ends (it failed) are killed."""
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.process is not None and worker.process.poll() is None:
            worker.kill()


@pytest.fixture(scope="module")
def slow_server() -> Iterator[ModelServer]:
    """Slow enough (20 ms + 10 ms per tile) that jobs are in every stage when a fault hits."""
    server = ModelServer("--fixed-ms", "20", "--per-tile-ms", "10")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Append-only with fsync on every write, so a restarted Redis has every acknowledged write."""
    server = RedisServer(tmp_path, persist=True)
    server.start()
    yield server
    server.kill()


def test_sigkill_each_stage_and_inference_beyond_max_attempts(
        durable_redis: RedisServer, slow_server: ModelServer, tmp_path: Path,
        workers: list[Worker]) -> None:
    bucket, storage, outputs = local_bucket(tmp_path)
    ledger = Ledger(durable_redis.client(), storage,
                    "SIGKILL inference twice (MAX_ATTEMPTS=2), then fetch, post, publish")
    ledger.submit(24)
    worker = Worker(durable_redis, slow_server, bucket, tmp_path / "worker.log", MAX_ATTEMPTS="2")
    workers.append(worker)
    with TerminalWrites([durable_redis.port]) as writes:
        worker.start()
        wait_for_stages(worker.process.pid, STAGES)
        for stage in ("inference", "inference", "fetch-0", "post-0", "publish"):
            ledger.wait_for_status({"predicting", "post-processing", "saving-results"})
            victim = stage_pids(worker.process.pid)[stage]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda s=stage, v=victim: stage_pids(worker.process.pid).get(s, v) != v,
                       30, f"{stage} to restart")
        results = ledger.audit(writes, outputs, log=worker.log_text,
                               budget_reason=r"^gave up after 2 attempts: the \w+ process died "
                                             r"\(exit code -9\)$")
    assert worker.stop() == 0
    assert len(re.findall(r"process died \(exit code -9\); restarting it", worker.log_text())) == 5
    assert any(fields["status"] == "failed" for fields in results.values()), \
        "the second inference kill should exhaust the attempts of the jobs it held"


def test_sigkill_whole_worker_restarted_under_its_own_name(
        durable_redis: RedisServer, slow_server: ModelServer, tmp_path: Path,
        workers: list[Worker]) -> None:
    """As when Kubernetes restarts an OOM-killed container in the same pod (same HOSTNAME)."""
    bucket, storage, outputs = local_bucket(tmp_path)
    client = durable_redis.client()
    ledger = Ledger(client, storage, "SIGKILL whole worker, restarted as the same pod")
    ledger.submit(12)
    first = Worker(durable_redis, slow_server, bucket, tmp_path / "first.log")
    workers.append(first)
    second = Worker(durable_redis, slow_server, bucket, tmp_path / "second.log")
    workers.append(second)
    with TerminalWrites([durable_redis.port]) as writes:
        first.start()
        wait_until(lambda: client.llen(f"processing-{QUEUE}:worker-a") >= 2, 60, "claims")
        children = list(wait_for_stages(first.process.pid, STAGES).values())
        first.kill()
        wait_until(lambda: not any(alive(pid) for pid in children), 10,
                   "stage processes to die with the supervisor")
        held = client.llen(f"processing-{QUEUE}:worker-a")
        second.start()
        ledger.audit(writes, outputs, log=lambda: first.log_text() + second.log_text())
    assert second.stop() == 0
    assert held and f"Returned {held} jobs left by a previous worker-a" in second.log_text()


def test_second_worker_on_the_queue_then_one_sigkilled(
        durable_redis: RedisServer, slow_server: ModelServer, tmp_path: Path,
        workers: list[Worker]) -> None:
    """Two live workers share the queue; when one dies, the other takes its jobs over."""
    bucket, storage, outputs = local_bucket(tmp_path)
    client = durable_redis.client()
    ledger = Ledger(client, storage, "second worker on the queue; first SIGKILLed")
    keys = ledger.submit(20)
    a = Worker(durable_redis, slow_server, bucket, tmp_path / "a.log")
    workers.append(a)
    b = Worker(durable_redis, slow_server, bucket, tmp_path / "b.log", HOSTNAME="worker-b")
    workers.append(b)
    with TerminalWrites([durable_redis.port]) as writes:
        a.start()
        b.start()
        wait_until(lambda: any(client.hget(k, "updated_by") == "worker-a"
                               and client.hget(k, "status") == "done" for k in keys), 60,
                   "worker-a to finish a job")
        wait_until(lambda: client.llen(f"processing-{QUEUE}:worker-a") >= 1, 60, "a claim")
        a.kill()
        results = ledger.audit(writes, outputs, log=lambda: a.log_text() + b.log_text())
    assert b.stop() == 0
    finishers = Counter(fields["updated_by"] for fields in results.values())
    assert finishers["worker-a"] and finishers["worker-b"], finishers
    assert "Worker worker-a stopped heartbeating; returned its" in b.log_text()


def test_redis_killed_and_restarted_mid_run(
        durable_redis: RedisServer, slow_server: ModelServer, tmp_path: Path,
        workers: list[Worker]) -> None:
    bucket, storage, outputs = local_bucket(tmp_path)
    ledger = Ledger(durable_redis.client(), storage, "Redis SIGKILLed, back after 3 s (AOF)")
    ledger.submit(16)
    worker = Worker(durable_redis, slow_server, bucket, tmp_path / "worker.log")
    workers.append(worker)
    with TerminalWrites([durable_redis.port]) as writes:
        worker.start()
        ledger.wait_for_status({"predicting", "post-processing", "saving-results"}, count=2)
        durable_redis.kill()
        time.sleep(3)
        durable_redis.start()
        ledger.audit(writes, outputs, log=worker.log_text)
    assert worker.stop() == 0
    assert "Redis reachable again after" in worker.log_text()


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, SentinelProcess]]:
    """A durable master, its replica, and a Sentinel that fails over within ~2 s."""
    with replicated_redis(tmp_path, persist=True) as servers:
        yield servers


def test_sentinel_failover_mid_run(
        replicated: tuple[RedisServer, RedisServer, SentinelProcess],
        slow_server: ModelServer, tmp_path: Path,
        workers: list[Worker]) -> None:
    from kiosk_pipeline.redis_connection import connect_redis

    master, replica, sentinel = replicated
    bucket, storage, outputs = local_bucket(tmp_path)
    client = connect_redis("127.0.0.1", sentinel.port, max_backoff=0.3)
    ledger = Ledger(client, storage, "Sentinel failover to the replica, old master killed")
    ledger.submit(16)
    worker = Worker(master, slow_server, bucket, tmp_path / "worker.log",
                    REDIS_PORT=str(sentinel.port))
    workers.append(worker)
    with TerminalWrites([replica.port], replicated_from=master.port) as writes:
        worker.start()
        ledger.wait_for_status({"predicting", "post-processing", "saving-results"}, count=2)
        wait_until(lambda: any(r["flags"] == "slave"
                               for r in sentinel.client.sentinel_slaves("mymaster")),
                   15, "the sentinel to see the replica")
        sentinel.client.execute_command("SENTINEL", "FAILOVER", "mymaster")
        wait_until(lambda: sentinel.client.sentinel_get_master_addr_by_name("mymaster")[1]
                   == replica.port, 15, "the failover")
        master.kill()
        ledger.audit(writes, outputs, log=worker.log_text, redone=True)
    assert worker.stop() == 0
    assert replica.client().info("replication")["role"] == "master"


def test_model_server_down_for_20_s(durable_redis: RedisServer, tmp_path: Path,
        workers: list[Worker]) -> None:
    """With the deployed defaults (GRPC_TIMEOUT 30, MAX_RETRY 5, GRPC_BACKOFF 3), a model
    server restart of 20 s must not fail the jobs waiting on it."""
    server = ModelServer("--fixed-ms", "20", "--per-tile-ms", "10")
    server.start()
    bucket, storage, outputs = local_bucket(tmp_path)
    ledger = Ledger(durable_redis.client(), storage, "model server stopped for 20 s")
    keys = ledger.submit(16)
    worker = Worker(durable_redis, server, bucket, tmp_path / "worker.log")
    workers.append(worker)
    try:
        with TerminalWrites([durable_redis.port]) as writes:
            worker.start()
            wait_until(lambda: durable_redis.client().hget(keys[0], "status") == "done", 60,
                       "the first job")
            server.stop()
            time.sleep(20)
            server.start()
            ledger.audit(writes, outputs, log=worker.log_text)
        assert worker.stop() == 0
    finally:
        server.stop()


@pytest.fixture
def s3_rig(s3_service: S3Service) -> Iterator[tuple[FlakyProxy, Storage, dict[str, str],
                                                    Callable[[], list[str]]]]:
    """A moto S3 bucket the worker reaches through a FlakyProxy: (proxy, storage, worker
    environment, lister of output archives). Jobs are uploaded directly, not through it."""
    bucket = s3_service.new_bucket()

    def outputs() -> list[str]:
        listing = s3_service.boto_client().list_objects_v2(Bucket=bucket, Prefix="output/")
        return [item["Key"] for item in listing.get("Contents", [])]

    with FlakyProxy(s3_service.endpoint_url, stall=2.0) as proxy:
        env = {"STORAGE_BUCKET": f"s3://{bucket}", "S3_ENDPOINT_URL": proxy.url,
               "AWS_ACCESS_KEY_ID": AWS_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
               "STORAGE_MAX_BACKOFF": "1"}
        yield proxy, s3_service.storage(bucket), env, outputs


def test_storage_errors_and_stalls_within_the_retry_budget(
        durable_redis: RedisServer, slow_server: ModelServer, s3_rig, tmp_path: Path,
        workers: list[Worker]) -> None:
    """503s, a dropped connection and a hung request while jobs flow: four failures in all, so
    no storage call can see more than four and every one is within its five attempts."""
    proxy, storage, env, outputs = s3_rig
    client = durable_redis.client()
    ledger = Ledger(client, storage, "S3: 503, 503, dropped connection, 2 s stall")
    keys = ledger.submit(16)
    worker = Worker(durable_redis, slow_server, tmp_path, tmp_path / "worker.log", **env)
    workers.append(worker)
    with TerminalWrites([durable_redis.port]) as writes:
        worker.start()
        for done, (fault, count) in enumerate(((503, 2), ("drop", 1), ("stall", 1)), start=1):
            wait_until(lambda n=done: len(proxy.requests) >= proxy.failures and sum(
                client.hget(k, "status") == "done" for k in keys) >= n, 60, f"{done} done")
            inject(proxy, fault, count)
        wait_until(lambda: len(proxy.requests) >= proxy.failures, 60, "the last fault")
        ledger.audit(writes, outputs, log=worker.log_text)
    assert worker.stop() == 0
    assert worker.log_text().count("retrying in") == 4


def test_storage_outage_beyond_the_retry_budget_then_restored(
        durable_redis: RedisServer, slow_server: ModelServer, s3_rig, tmp_path: Path,
        workers: list[Worker]) -> None:
    """While S3 answers only 503s, jobs fail once their five attempts are spent, each with a
    reason that says so; once it is back, the next jobs succeed."""
    proxy, storage, env, outputs = s3_rig
    client = durable_redis.client()
    ledger = Ledger(client, storage, "S3 down (503) past 5 attempts, then restored")
    before = ledger.submit(2)
    worker = Worker(durable_redis, slow_server, tmp_path, tmp_path / "worker.log", **env)
    workers.append(worker)
    with TerminalWrites([durable_redis.port]) as writes:
        worker.start()
        wait_until(lambda: all(client.hget(k, "status") == "done" for k in before), 60,
                   "the jobs before the outage")
        inject(proxy, 503, 10**9)
        during = ledger.submit(4)
        wait_until(lambda: all(client.hget(k, "status") == "failed" for k in during), 90,
                   "the jobs submitted during the outage to fail")
        proxy.failures = len(proxy.requests)
        after = ledger.submit(4)
        results = ledger.audit(writes, outputs, log=worker.log_text,
                               budget_reason=r"failed after 5 attempts: HTTP 503 "
                                             r"Service Unavailable$")
    assert worker.stop() == 0
    assert [results[k]["status"] for k in [*before, *after]] == ["done"] * 6
