"""connect_redis against real servers: plain, password, TLS, Sentinel and a Sentinel failover."""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from kiosk_pipeline.jobs import JobQueue
from kiosk_pipeline.redis_connection import connect_redis
from tests.fixtures.redis_server import RedisServer, free_port, redis_binary

PASSWORD = "s3cret-Pa55"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class SentinelProcess:
    """`redis-server sentinel.conf --sentinel` monitoring one master as `mymaster`."""

    def __init__(self, workdir: Path, master_port: int, password: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {workdir}",
                 f"sentinel monitor mymaster 127.0.0.1 {master_port} 1",
                 "sentinel down-after-milliseconds mymaster 2000",
                 "sentinel failover-timeout mymaster 3000"]
        if password:
            lines += [f"requirepass {password}", f"sentinel auth-pass mymaster {password}"]
        self.config = workdir / "sentinel.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen([redis_binary(), str(self.config), "--sentinel"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, password=password,
                                  decode_responses=True, socket_timeout=1)
        wait_until(self._answers, 10, "sentinel to start")

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@contextlib.contextmanager
def replicated_redis(tmp_path: Path, persist: bool = False
                     ) -> Iterator[tuple[RedisServer, RedisServer, SentinelProcess]]:
    """A master, its synced replica, and a Sentinel that fails over within ~2 s."""
    master = RedisServer(tmp_path / "master", persist=persist,
                         extra_args=("--repl-diskless-sync-delay", "0"))
    replica = RedisServer(tmp_path / "replica", persist=persist)
    for server in (master, replica):
        server.workdir.mkdir()
    master.start()
    replica.extra_args = ("--replicaof", "127.0.0.1", str(master.port))
    replica.start()
    wait_until(lambda: replica.client().info("replication")["master_link_status"] == "up", 10,
               "the replica to sync")
    sentinel = SentinelProcess(tmp_path / "sentinel", master.port)
    try:
        yield master, replica, sentinel
    finally:
        sentinel.stop()
        replica.kill()
        master.kill()


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, SentinelProcess]]:
    with replicated_redis(tmp_path) as servers:
        yield servers


def test_plain_redis(redis_server: RedisServer) -> None:
    client = connect_redis("127.0.0.1", redis_server.port)
    client.set("k", "v")
    assert client.get("k") == "v"  # decoded to str
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 10.0


def test_url_with_password_and_db(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(tmp_path)
    server.start()
    server.client().config_set("requirepass", PASSWORD)
    try:
        caplog.set_level(logging.DEBUG)
        client = connect_redis(url=f"redis://:{PASSWORD}@127.0.0.1:{server.port}/3")
        client.set("k", "v")
        direct = redis.Redis(port=server.port, password=PASSWORD, db=3, decode_responses=True)
        assert direct.get("k") == "v"
        overridden = connect_redis(url=f"redis://:wrong@127.0.0.1:{server.port}/0",
                                   password=PASSWORD)
        assert overridden.ping()
        started = time.monotonic()
        with pytest.raises(redis.AuthenticationError):
            connect_redis("127.0.0.1", server.port, password="wrong", startup_timeout=30)
        assert time.monotonic() - started < 2
        assert PASSWORD not in caplog.text
    finally:
        server.stop()


def test_start_up_waits_for_redis_then_gives_up(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    starter = threading.Timer(0.5, server.start)
    starter.start()
    try:
        client = connect_redis("127.0.0.1", server.port, max_backoff=0.2, startup_timeout=10)
        assert client.ping()
    finally:
        starter.join()
        server.stop()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        connect_redis("127.0.0.1", free_port(), max_backoff=0.2, startup_timeout=0.5)
    assert time.monotonic() - started < 3


def make_certificate(directory: Path) -> tuple[Path, Path]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_url_with_password(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [redis_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
         str(cert), "--tls-auth-clients", "no", "--requirepass", PASSWORD, "--save", "",
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = connect_redis(
            url=f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}",
            startup_timeout=10, max_backoff=0.2)
        client.set("k", "v")
        assert client.get("k") == "v"
        assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == str(cert)
    finally:
        process.terminate()
        process.wait(10)


def test_sentinel_is_detected_and_named(
        replicated: tuple[RedisServer, RedisServer, SentinelProcess]) -> None:
    master, _, sentinel = replicated
    client = connect_redis("127.0.0.1", sentinel.port)
    client.set("through-sentinel", "1")
    assert master.client().get("through-sentinel") == "1"
    named = connect_redis("127.0.0.1", sentinel.port, sentinel_master="mymaster")
    assert named.get("through-sentinel") == "1"
    with pytest.raises(ValueError, match="does not monitor 'other'"):
        connect_redis("127.0.0.1", sentinel.port, sentinel_master="other")
    with pytest.raises(ValueError, match="not a Sentinel"):
        connect_redis("127.0.0.1", master.port, sentinel_master="mymaster")


def test_sentinel_with_password(tmp_path: Path) -> None:
    master = RedisServer(tmp_path)
    master.start()
    master.client().config_set("requirepass", PASSWORD)
    sentinel = SentinelProcess(tmp_path / "sentinel", master.port, password=PASSWORD)
    try:
        client = connect_redis(url=f"redis://:{PASSWORD}@127.0.0.1:{sentinel.port}")
        client.set("k", "v")
        assert redis.Redis(port=master.port, password=PASSWORD).get("k") == b"v"
    finally:
        sentinel.stop()
        master.stop()


def test_jobs_follow_a_sentinel_failover(
        replicated: tuple[RedisServer, RedisServer, SentinelProcess]) -> None:
    master, replica, sentinel = replicated
    client = connect_redis("127.0.0.1", sentinel.port, max_backoff=0.3)
    assert client.connection_pool.get_master_address() == ("127.0.0.1", master.port)
    jobs = JobQueue(client, "segmentation", "pod-a", max_backoff=0.3)
    client.hset("segmentation:a.png:1", mapping={"status": "new", "input_file_name": "a.png"})
    client.lpush("segmentation", "segmentation:a.png:1")
    assert jobs.claim(1.0) is not None
    client.execute_command("WAIT", 1, 1000)

    wait_until(lambda: any(r["flags"] == "slave"
                           for r in sentinel.client.sentinel_slaves("mymaster")),
               15, "the sentinel to see the replica")
    sentinel.client.execute_command("SENTINEL", "FAILOVER", "mymaster")
    wait_until(lambda: sentinel.client.sentinel_get_master_addr_by_name("mymaster")[1]
               == replica.port, 10, "the failover")
    master.kill()  # the old master is gone, as when its pod dies

    assert jobs.finish("segmentation:a.png:1", {"output_url": "file:///a.zip"})
    assert replica.client().hget("segmentation:a.png:1", "status") == "done"
    assert replica.client().info("replication")["role"] == "master"
