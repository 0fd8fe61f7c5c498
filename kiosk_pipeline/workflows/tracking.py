"""`caliban` (alias `tracking`): segment every frame of a movie, then link cells into lineages.

The Kiosk's CalibanConsumer pushed one segmentation job per frame, polled them from a held
consumer slot, then called the tracking model once per frame (reference §4.4). Here a (T, Y, X)
TIFF is one job whose T frames are T units through the shared batcher (nuclear segmentation by
default, or the model at the first filled position of `channels`; CLAHE and deep watershed as
the segmentation workflow), and the linking (`kiosk_pipeline.tracking.linking`, a Hungarian
assignment with birth, death and division, MAX_DISTANCE, TRACK_LENGTH, DIVISION, BIRTH, DEATH)
runs in the post pool once every frame is labelled.

A `.trk`/`.trks` upload already holds its labels (`tracked.npy`), which are tracked as they
are, with no model: such a job runs in a fetch process (`consumer_for`).

Outputs, as the original: `{name}_feature_0.tif`, the tracked (T, Y, X) label movie, and
`lineage.json` (`{label: {label, frames, daughters, capped, frame_div, parent}}`); with the hash
field `save_trk` set (true, 1, yes) also `{name}.trk` (raw, tracked, lineage).
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from functools import cached_property

import numpy as np

from kiosk_pipeline.config import Settings
from kiosk_pipeline.imaging.decode import decode_image, parse_channels
from kiosk_pipeline.imaging.normalize import histogram_normalization
from kiosk_pipeline.imaging.output import build_zip, encode_label_tiff
from kiosk_pipeline.imaging.resize import resize_image, resize_labels, scaled_shape
from kiosk_pipeline.imaging.watershed import deep_watershed
from kiosk_pipeline.storage.base import Storage
from kiosk_pipeline.tracking.linking import TrackingParams, track_cells
from kiosk_pipeline.tracking.trk import TrkLimits, load_trk, save_trk
from kiosk_pipeline.workflows.base import (
    JobError,
    ModelDescriber,
    ModelInput,
    ModelRef,
    OutputFile,
    PostInput,
    Workflow,
    output_stem,
)
from kiosk_pipeline.workflows.consumer import Consumer
from kiosk_pipeline.workflows.segmentation import (
    INTERIOR_HEAD,
    MAXIMA_HEAD,
    WATERSHED,
    parse_scale,
)

MOVIES = (".tif", ".tiff")
TRACKS = (".trk", ".trks")


def tracking_params(settings: Settings) -> TrackingParams:
    return TrackingParams(max_distance=settings.max_distance, track_length=settings.track_length,
                          division=settings.division, birth=settings.birth, death=settings.death,
                          appearance=settings.tracking_appearance)


def wants_trk(fields: dict[str, str]) -> bool:
    return (fields.get("save_trk") or "").strip().lower() in ("1", "true", "yes")


def tracking_outputs(stem: str, raw: np.ndarray | None, labels: np.ndarray,
                     params: TrackingParams, trk: bool) -> list[OutputFile]:
    """Track a (T, Y, X) label movie; the Kiosk's result files."""
    tracked, lineage = track_cells(labels, params, raw if params.appearance > 0 else None)
    files = [(f"{stem}_feature_0.tif", encode_label_tiff(tracked)),
             ("lineage.json", json.dumps(lineage).encode())]
    if trk and raw is not None:
        files.append((f"{stem}.trk", save_trk(raw, tracked, lineage)))
    return files


class TrackingWorkflow(Workflow):
    name = "caliban"
    aliases = ("tracking",)

    def validate(self, fields: dict[str, str]) -> str | None:
        if not fields.get("input_file_name", "").lower().endswith(MOVIES + TRACKS):
            return f'Invalid filetype for "{self.settings.queue}" job.'
        return None

    def consumer_for(self, fields: dict[str, str]) -> Consumer | None:
        """A `.trk`/`.trks` job needs no model: it is tracked in the fetch process."""
        if fields.get("input_file_name", "").lower().endswith(TRACKS):
            return self._labelled
        return None

    @cached_property
    def _labelled(self) -> LabelledMovieConsumer:
        return LabelledMovieConsumer(self.settings)

    @cached_property
    def storage(self) -> Storage:
        """For re-reading the raw movie in the post pool (appearance cost, `.trk` output)."""
        return self.settings.open_storage()

    def prepare(self, fields: dict[str, str], image: np.ndarray,
                describe: ModelDescriber) -> tuple[list[ModelInput], dict[str, str]]:
        movie = image[..., 0] if image.ndim == 4 and image.shape[-1] == 1 else image
        if movie.ndim != 3:
            raise JobError(f"tracking takes a (frames, y, x) movie; the image has shape "
                           f"{image.shape}")
        if movie.shape[0] > self.settings.max_image_frames:
            raise JobError(f"the movie has {movie.shape[0]} frames; at most "
                           f"{self.settings.max_image_frames} are accepted (MAX_IMAGE_FRAMES)")
        positions = [p for p, c in enumerate(parse_channels(fields.get("channels") or "0"))
                     if c is not None]
        models = (self.settings.nuclear_model, self.settings.cytoplasm_model,
                  self.settings.phase_model)
        if not positions or positions[0] >= len(models):
            raise JobError(f"channels {fields.get('channels')!r} selects no segmentation model")
        model = ModelRef.parse(models[positions[0]])
        if describe(model).channels != 1:
            raise JobError(f"model {model} does not take one channel")
        scale = parse_scale(fields.get("scale"), self.settings.min_scale,
                            self.settings.max_scale)
        original = movie.shape[1:3]
        target = scaled_shape(original, scale)
        post = {"stem": output_stem(fields), "source": fields["input_file_name"],
                "trk": wants_trk(fields)}
        inputs = []
        for t, frame in enumerate(movie):
            resized = resize_image(frame[..., None].astype(np.float32), target)
            inputs.append(ModelInput(
                model=model, image=histogram_normalization(resized[None])[0],
                heads=(MAXIMA_HEAD, INTERIOR_HEAD), label_names=(f"frame_{t}",),
                pad_mode="reflect", post={**post, "frame": t}, output_shape=original))
        return inputs, {"progress": "0"}

    def postprocess(self, model_input: PostInput, predictions: np.ndarray,
                    out: np.ndarray) -> None:
        labels = deep_watershed(predictions[..., 0], predictions[..., 1], **WATERSHED)
        resize_labels(labels, model_input.output_shape, out[..., 0])
        return None

    def results(self, inputs: list[PostInput], labels: list[np.ndarray],
                files: list[list[OutputFile]]) -> list[OutputFile]:
        """Link the labelled frames into tracks once all of them are segmented."""
        post = inputs[0].post
        params = tracking_params(self.settings)
        movie = np.stack([frame[..., 0] for frame in labels])
        raw = None
        if post["trk"] or params.appearance > 0:
            s = self.settings
            raw = decode_image(self.storage.read_bytes(post["source"]), post["source"],
                               max_height=s.max_image_height, max_width=s.max_image_width,
                               max_frames=s.max_image_frames, max_pixels=s.max_pixels)
            raw = raw.reshape(movie.shape)
        return tracking_outputs(post["stem"], raw, movie, params, post["trk"])


class LabelledMovieConsumer(Consumer):
    """Tracks the labels a `.trk`/`.trks` upload holds (no model), in a fetch process."""

    def _consume(self, redis_hash: str) -> str:
        s = self.settings
        fields = self.redis.hgetall(redis_hash)
        started = time.perf_counter()
        name = fields["input_file_name"]
        data = self.storage.read_bytes(name)
        self.update_key(redis_hash, {"progress": 0,
                                     "download_time": f"{time.perf_counter() - started:.3f}"})
        limits = TrkLimits(s.max_image_frames, s.max_image_height, s.max_image_width,
                           s.max_pixels * 8)
        raw, labels = load_trk(data, posixpath.basename(name), limits)
        if not labels.any():
            raise JobError("the .trk holds no labels (tracked.npy is empty); upload the raw "
                           "movie as a (frames, y, x) TIFF to have it segmented")
        self.update_key(redis_hash, {"status": "predicting"})
        files = tracking_outputs(output_stem(fields), raw, labels, tracking_params(s),
                                 wants_trk(fields))
        self.update_key(redis_hash, {"status": "saving-results"})
        uploaded = time.perf_counter()
        dest, url = self.storage.upload_bytes(build_zip(files), f"{uuid.uuid4().hex}.zip")
        self.update_key(redis_hash, {"output_url": url, "output_file_name": dest,
                                     "total_jobs": 1,
                                     "upload_time": f"{time.perf_counter() - uploaded:.3f}"})
        return self.final_status
