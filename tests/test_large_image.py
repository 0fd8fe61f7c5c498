"""A 10,240 x 10,240 image goes through the worker within the default arena, and the arena's
pages go back to the OS once the job is done, so one large image does not pin its memory for
the life of the pod."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from kiosk_pipeline.imaging.metrics import f1_at_iou
from kiosk_pipeline.imaging.synthetic import make_cells
from kiosk_pipeline.storage import open_storage
from kiosk_pipeline.submit import submit_job, wait_for
from tests.fixtures.pipeline import Worker, read_label_zip
from tests.test_end_to_end import tiff_bytes

pytestmark = pytest.mark.slow
BLOCK, MARGIN, BLOCKS = 512, 16, 20
ARENA_MB = 4096


def mosaic() -> tuple[np.ndarray, np.ndarray]:
    """BLOCKS x BLOCKS synthetic fields, each inside a dark margin so no cell spans two."""
    fields = [make_cells((BLOCK - 2 * MARGIN,) * 2, n_cells=120, seed=seed) for seed in range(4)]
    side = BLOCK * BLOCKS
    image = np.full((side, side), 0.05, np.float32)
    truth = np.zeros((side, side), np.int32)
    for by in range(BLOCKS):
        for bx in range(BLOCKS):
            cells, labels = fields[(by + bx) % len(fields)]
            inner = np.s_[by * BLOCK + MARGIN:(by + 1) * BLOCK - MARGIN,
                          bx * BLOCK + MARGIN:(bx + 1) * BLOCK - MARGIN]
            image[inner] = cells[..., 0]
            truth[inner] = np.where(labels > 0, labels + (by * BLOCKS + bx) * 1000, 0)
    return image, truth


def arena_segments() -> set[Path]:
    return {path for path in Path("/dev/shm").glob("psm_*")
            if path.stat().st_size == ARENA_MB << 20}


def resident_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_10k_image_is_segmented_and_its_arena_pages_are_returned(
        redis_server, model_server, tmp_path):
    image, truth = mosaic()
    bucket = tmp_path / "bucket"
    client = redis_server.client()
    key = submit_job(client, open_storage(f"file://{bucket}"), "segmentation",
                     tiff_bytes(image), "slide.tif")
    del image
    before = arena_segments()
    worker = Worker(redis_server, model_server, bucket, tmp_path / "worker.log",
                    ARENA_MB=str(ARENA_MB), MAX_IMAGE_HEIGHT="10240", MAX_IMAGE_WIDTH="10240")
    worker.start()
    try:
        fields = wait_for(client, [key], timeout=600)[key]
        assert fields["status"] == "done", (fields, worker.log_text()[-3000:])
        (segment,) = arena_segments() - before
        deadline = time.monotonic() + 10
        while resident_bytes(segment) > 64 << 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert resident_bytes(segment) <= 64 << 20
    finally:
        assert worker.stop() == 0
    (labels,) = read_label_zip(bucket, fields["output_file_name"]).values()
    assert labels.shape == truth.shape
    assert f1_at_iou(truth, labels) >= 0.9
