"""A deep queue stays in Redis: the worker claims only what its stages can use now.

The model server here accepts 16 tiles per request while the worker starts from the Kiosk's
TF_MAX_BATCH_SIZE of 64, as in kiosk-console#449. The worker holds its requests in flight plus
two batches waiting, counted at the size the server accepts as soon as it has said so, and
claims one job at a time as the stages make room.
"""

from __future__ import annotations

import time

import pytest

from kiosk_pipeline.imaging.synthetic import make_cells
from kiosk_pipeline.storage import open_storage
from kiosk_pipeline.submit import submit_job
from tests.fixtures.pipeline import Frontend, ModelServer, Worker
from tests.test_end_to_end import tiff_bytes

pytestmark = pytest.mark.slow
QUEUED = 400
#: Watch the claims until this many jobs are done, the first numba compilations included.
DONE = 60
#: 512 x 512 images are 9 tiles of 256 x 256 each.
TILES_PER_JOB = 9


def test_deep_queue_claims_bounded_by_answered_batches(redis_server, tmp_path):
    server = ModelServer("--fixed-ms", "40", "--per-tile-ms", "2", "--max-batch-size", "16")
    server.start()
    client = redis_server.client()
    storage = open_storage(f"file://{tmp_path}/bucket")
    image, _ = make_cells((512, 512), n_cells=40, seed=3)
    frontend = Frontend(client, "segmentation",
                        submit_job(client, storage, "segmentation", tiff_bytes(image), "cells.tif"))
    frontend.push(QUEUED - 1)

    worker = Worker(redis_server, server, tmp_path / "bucket", tmp_path / "worker.log",
                    TF_MAX_BATCH_SIZE="64")
    worker.start()
    try:
        claimed, finished, deadline = [], 0, time.monotonic() + 300
        while finished < DONE and time.monotonic() < deadline:
            held = client.llen("processing-segmentation:worker-a")
            claimed.append(held)
            finished = QUEUED - client.llen("segmentation") - held
            time.sleep(0.02)
        code = worker.stop()
    finally:
        server.stop()

    # Inference holds under (INFLIGHT 2 + 2) x 16 tiles, plus one job; fetch, the post queue,
    # post and publish hold one or two jobs each.
    bound = (4 * 16) // TILES_PER_JOB + 1 + 8
    statuses = [client.hget(key, "status") for key in frontend.keys]
    assert code == 0
    assert max(claimed) <= bound, f"claimed up to {max(claimed)} jobs at once"
    assert statuses.count("done") >= DONE
    assert client.llen("processing-segmentation:worker-a") == 0
    assert statuses.count("done") + client.llen("segmentation") == QUEUED
