"""Settings from the Kiosk consumer's environment variables, plus the pipeline's own.

Every variable the original consumer read keeps its name, meaning and default, so an existing
Kiosk deployment's manifests work unchanged. An invalid value stops start-up with one line that
names the variable, the value and what is allowed (`ConfigError`, exit code 2 from the CLI).
"""

from __future__ import annotations

import argparse
import os
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from kiosk_pipeline.storage.base import Storage

MODEL_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+:\d+$")
DEFAULT_STORAGE_DIR = "/tmp/kiosk-pipeline"


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message is one line for the operator."""


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """All settings; field `x_y` is environment variable `X_Y` and CLI flag `--x-y`."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore",
                                      validate_default=True)

    # --- the Kiosk consumer's core settings (same names and defaults) ---
    consumer_type: str = Field("image", description="Job type: segmentation (image), mesmer "
                               "(multiplex), zip, or a plugin's name")
    queue: str = Field("predict", description="Redis queue to claim jobs from")
    segmentation_queue: str = Field("predict", description="Queue for segmentation children")
    interval: float = Field(10.0, gt=0, description="Legacy child poll period, seconds")
    max_retry: int = Field(5, description="gRPC retry cap for retryable errors (<= 0: no cap "
                           "other than GRPC_TIMEOUT)")
    max_image_height: int = Field(2048, gt=0, description="Largest accepted image height")
    max_image_width: int = Field(2048, gt=0, description="Largest accepted image width")
    max_image_frames: int = Field(60, gt=0, description="Largest accepted number of frames")
    redis_host: str = Field("redis-master", description="Redis or Sentinel host")
    redis_port: int = Field(6379, ge=1, le=65535, description="Redis or Sentinel port")
    redis_timeout: float = Field(3.0, gt=0, description="Longest backoff between Redis "
                                 "reconnection attempts, seconds")
    empty_queue_timeout: float = Field(5.0, gt=0, description="Blocking claim timeout, seconds")
    do_nothing_timeout: float = Field(0.5, ge=0, description="Pause after a put-back, seconds")
    tf_host: str = Field("tf-serving", description="TensorFlow Serving host")
    tf_port: int = Field(8500, ge=1, le=65535, description="TensorFlow Serving gRPC port")
    tf_max_batch_size: int = Field(64, gt=0, description="Largest Predict batch in tiles; keep "
                                   "it <= the server's max_batch_size")
    tf_min_model_size: int = Field(128, gt=0, description="Reference tile size for the "
                                   "original's batch-size rule")
    grpc_timeout: float = Field(30.0, gt=0, description="Predict deadline, seconds")
    grpc_backoff: float = Field(3.0, ge=0, description="Longest gRPC retry backoff, seconds")
    storage_max_backoff: float = Field(60.0, gt=0, description="Longest storage retry "
                                       "backoff, seconds")
    storage_bucket: str | None = Field(None, description="file:///dir, s3://bucket or "
                                       f"gs://bucket (default file://{DEFAULT_STORAGE_DIR})")
    cloud_provider: Literal["aws", "gke"] | None = Field(None, description="Legacy: aws or "
                                                         "gke, with AWS_S3_BUCKET or "
                                                         "GCLOUD_STORAGE_BUCKET")
    gcloud_storage_bucket: str | None = Field(None, description="Legacy GCS bucket name")
    aws_s3_bucket: str | None = Field(None, description="Legacy S3 bucket name")
    aws_region: str = Field("us-east-1", description="AWS region")
    hostname: str = Field("host-unkonwn", description="Worker identity (the pod name)")
    expire_time: int = Field(3600, gt=0, description="Seconds a finished job hash is kept")
    metadata_expire_time: int = Field(30, gt=0, description="Seconds model metadata is cached")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "DEBUG", description="Logging level")

    # --- models and their parameters (same names and defaults) ---
    nuclear_model: str = Field("NuclearSegmentation:6", description="Model for channel "
                               "position 0 (nuclear)")
    cytoplasm_model: str = Field("CytoplasmSegmentation:5", description="Model for channel "
                                 "position 1 (whole-cell)")
    phase_model: str = Field("PhaseCytoSegmentation:0", description="Model for channel "
                             "position 2 (phase)")
    multiplex_model: str = Field("MultiplexSegmentation:9", description="Deprecated name of "
                                 "MESMER_MODEL")
    mesmer_model: str | None = Field(None, description="Mesmer model (default MULTIPLEX_MODEL)")
    mesmer_compartment: Literal["whole-cell", "nuclear", "both"] = Field(
        "whole-cell", description="Mesmer compartment when the job names none")
    tracking_model: str = Field("NuclearTrackingInf:6", description="Tracking inference model")
    caliban_model: str | None = Field(None, description="Tracking model (default "
                                      "TRACKING_MODEL)")
    neighborhood_encoder: str = Field("NuclearTrackingNE:6", description="Tracking "
                                      "neighbourhood encoder model")
    max_distance: float = Field(50.0, gt=0, description="Tracking distance threshold, pixels")
    track_length: int = Field(8, gt=0, description="Tracking history length, frames")
    division: float = Field(0.9, ge=0, le=1, description="Tracking division cost")
    birth: float = Field(0.99, ge=0, le=1, description="Tracking birth cost")
    death: float = Field(0.99, ge=0, le=1, description="Tracking death cost")
    max_scale: float = Field(10.0, gt=1, description="Largest accepted `scale`")
    min_scale: float | None = Field(None, gt=0, description="Smallest accepted `scale` "
                                    "(default 1/MAX_SCALE)")
    polaris_model: str = Field("SpotDetection:3", description="Spot detection model")
    polaris_threshold: float = Field(0.95, ge=0, le=1, description="Spot probability threshold")
    polaris_clip: bool = Field(False, description="Clip spot images to percentiles first")
    polaris_scale: float = Field(0.38, gt=0, description="Scale of Polaris segmentation")
    tracking_appearance: float = Field(0.0, ge=0, description="Weight of the appearance cost "
                                       "in tracking (0: overlap and distance only)")
    zip_max_members: int = Field(10_000, ge=1, description="Most entries a zip job may hold")
    zip_max_total_mb: int = Field(4096, ge=1, description="Most uncompressed MiB in a zip job")
    zip_max_ratio: float = Field(200.0, gt=1, description="Largest compression ratio of a "
                                 "zip member of 1 MiB or more")

    # --- connection and security (new) ---
    redis_url: str | None = Field(None, description="redis:// or rediss:// URL with password; "
                                  "overrides REDIS_HOST/REDIS_PORT")
    redis_password: str | None = Field(None, description="Redis password", repr=False)
    redis_sentinel_master: str | None = Field(None, description="Sentinel master name "
                                              "(default: the one Sentinel monitors)")
    tf_tls: bool = Field(False, description="Use TLS to the model server")
    tf_tls_ca: str | None = Field(None, description="CA bundle for the model server's TLS")
    storage_signed_url_expiry: int | None = Field(None, gt=0, description="Give signed output "
                                                  "URLs valid this many seconds")
    storage_public: bool = Field(False, description="Make outputs world-readable "
                                 "(the original's publicRead)")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. MinIO")

    # --- the pipeline (new) ---
    fetch_workers: int | None = Field(None, ge=1, description="Download/decode/normalise "
                                      "processes (default: from the CPU count)")
    post_workers: int | None = Field(None, ge=1, description="Post-processing processes "
                                     "(default: from the CPU count)")
    inflight: int = Field(2, ge=1, description="Predict requests kept in flight (two keep "
                          "a server that runs one batch at a time busy)")
    max_batch: int | None = Field(None, ge=1, description="Tiles per Predict request "
                                  "(default TF_MAX_BATCH_SIZE)")
    batch_timeout_ms: float = Field(5.0, ge=0, description="Longest wait for a fuller batch, ms")
    arena_mb: int = Field(4096, ge=64, description="Shared-memory arena size, MiB; bounds "
                          "memory and the jobs in flight")
    max_jobs_in_flight: int = Field(64, ge=1, description="Most jobs held at once")
    max_attempts: int = Field(3, ge=1, description="Attempts per job before it fails")
    drain_timeout: float = Field(30.0, ge=0, description="Seconds to finish in-flight jobs on "
                                 "SIGTERM before returning them to the queue")
    heartbeat_interval: float = Field(5.0, gt=0, description="Worker heartbeat period, seconds")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Serve Prometheus "
                                     "/metrics on this port")
    max_pixels: int = Field(2**28, gt=0, description="Largest accepted image, total pixels")

    @field_validator("nuclear_model", "cytoplasm_model", "phase_model", "multiplex_model",
                     "mesmer_model", "tracking_model", "caliban_model", "neighborhood_encoder",
                     "polaris_model")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and not MODEL_PATTERN.match(value):
            raise ValueError("expected NAME:VERSION with an integer version, e.g. "
                             "NuclearSegmentation:6")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("queue", "segmentation_queue")
    @classmethod
    def _lower_queue(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected a non-empty queue name")
        return value.strip().lower()

    @field_validator("tf_tls_ca")
    @classmethod
    def _readable_file(cls, value: str | None) -> str | None:
        if value is not None and not os.access(value, os.R_OK):
            raise ValueError("expected a readable PEM file of CA certificates")
        return value

    @field_validator("storage_bucket")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(file:///|s3://[^/]|gs://[^/])", value, re.I):
            raise ValueError("expected file:///absolute/dir, s3://bucket or gs://bucket")
        return value

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        if self.mesmer_model is None:
            self.mesmer_model = self.multiplex_model
        if self.caliban_model is None:
            self.caliban_model = self.tracking_model
        if self.min_scale is None:
            self.min_scale = 1.0 / self.max_scale
        cores = _cpu_count()
        if self.fetch_workers is None:
            self.fetch_workers = max(1, cores // 2)
        if self.post_workers is None:
            self.post_workers = max(1, cores)
        if self.max_batch is None:
            self.max_batch = self.tf_max_batch_size
        return self

    @property
    def storage_url(self) -> str:
        """The bucket URL from STORAGE_BUCKET, or the seed's CLOUD_PROVIDER variables."""
        from kiosk_pipeline.storage import resolve_bucket_url

        return resolve_bucket_url(self.storage_bucket, self.cloud_provider,
                                  self.gcloud_storage_bucket, self.aws_s3_bucket,
                                  default=f"file://{DEFAULT_STORAGE_DIR}")

    def open_storage(self) -> Storage:
        """The bucket with every storage setting applied (retries, signing, S3 endpoint)."""
        from kiosk_pipeline.storage import open_storage

        return open_storage(self.storage_url, max_backoff=self.storage_max_backoff,
                            signed_url_expiry=self.storage_signed_url_expiry,
                            public=self.storage_public, region=self.aws_region,
                            endpoint_url=self.s3_endpoint_url)


def env_name(field: str) -> str:
    return field.upper()


def _describe(error: dict[str, Any]) -> str:
    field = str(error["loc"][0]) if error.get("loc") else ""
    name = env_name(field) if field else "configuration"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and field:
        return f"invalid {name}={error['input']!r}: {message}"
    return f"invalid {name}: {message}"


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--x-y` flag per setting, overriding environment variable X_Y."""
    group = parser.add_argument_group(
        "settings", "each flag overrides the environment variable named in its help")
    for field, info in Settings.model_fields.items():
        default = info.default if info.default is not None else "unset"
        group.add_argument(f"--{field.replace('_', '-')}", dest=f"setting_{field}",
                           metavar=env_name(field), default=None,
                           help=f"{info.description} [{env_name(field)}; default {default}]")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {key.removeprefix("setting_"): value for key, value in vars(args).items()
                 if key.startswith("setting_")}
    return load_settings(overrides)


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Read the environment; `overrides` (from CLI flags) win over variables."""
    try:
        return Settings(**{k: v for k, v in (overrides or {}).items() if v is not None})
    except ValidationError as error:
        raise ConfigError(_describe(error.errors()[0])) from None
