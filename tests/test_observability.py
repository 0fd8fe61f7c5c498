"""Many small jobs in flight fill each Predict request from several jobs; the worker's
Prometheus endpoint and `kiosk-pipeline status` show what it is doing."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from kiosk_pipeline.imaging.synthetic import make_cells
from kiosk_pipeline.storage import open_storage
from kiosk_pipeline.submit import submit_job, wait_for
from tests.fixtures.pipeline import ModelServer, Worker, wait_for_port
from tests.fixtures.redis_server import free_port
from tests.test_end_to_end import tiff_bytes

pytestmark = pytest.mark.slow


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_batches_fill_from_many_small_jobs_and_metrics_report_it(redis_server, tmp_path):
    server = ModelServer("--fixed-ms", "150", "--per-tile-ms", "5", "--max-batch-size", "16")
    server.start()
    bucket = tmp_path / "bucket"
    storage = open_storage(f"file://{bucket}")
    client = redis_server.client()
    image, _ = make_cells((256, 256), n_cells=15, seed=1)
    data = tiff_bytes(image)
    keys = [submit_job(client, storage, "segmentation", data, f"small{i}.tif")
            for i in range(320)]
    port = free_port()
    worker = Worker(redis_server, server, bucket, tmp_path / "worker.log", MAX_BATCH="16",
                    INFLIGHT="2", BATCH_TIMEOUT_MS="50", METRICS_PORT=str(port))
    try:
        worker.start()
        wait_for_port(port)
        status = subprocess.run(
            [sys.executable, "-m", "kiosk_pipeline", "status", "segmentation",
             "--redis-url", redis_server.url], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert "worker-a" in status.stdout
        results = wait_for(client, keys, timeout=240)
        assert [r["status"] for r in results.values()].count("done") == len(keys)
        time.sleep(1.5)
        metrics = scrape(port)
    finally:
        worker.stop()
        server.stop()
    assert metrics['kiosk_pipeline_jobs_total{outcome="done"}'] == len(keys)
    assert metrics["kiosk_pipeline_tiles_predicted"] == len(keys)
    assert metrics["kiosk_pipeline_batch_fill"] >= 0.9
    for stage in ("fetch", "inference", "post", "publish"):
        assert metrics[f'kiosk_pipeline_stage_busy_seconds_total{{stage="{stage}"}}'] >= 0
