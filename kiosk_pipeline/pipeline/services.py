"""The connections a stage process needs, made once per process from the settings."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import redis

from kiosk_pipeline.config import Settings
from kiosk_pipeline.jobs import JobQueue
from kiosk_pipeline.redis_connection import connect_redis
from kiosk_pipeline.retry import Backoff
from kiosk_pipeline.serving import PredictClient
from kiosk_pipeline.storage.base import Storage
from kiosk_pipeline.workflows.base import (
    JobError,
    ModelDescriber,
    ModelRef,
    ModelShape,
    Workflow,
)
from kiosk_pipeline.workflows.registry import get_workflow


class Services:
    """Lazily built, so a process only connects to what its stage uses."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def redis(self) -> redis.Redis:
        s = self.settings
        return connect_redis(s.redis_host, s.redis_port, url=s.redis_url,
                             password=s.redis_password, sentinel_master=s.redis_sentinel_master,
                             max_backoff=s.redis_timeout)

    @cached_property
    def jobs(self) -> JobQueue:
        s = self.settings
        return JobQueue(self.redis, s.queue, s.hostname, expire_time=s.expire_time,
                        heartbeat_interval=s.heartbeat_interval, max_backoff=s.redis_timeout,
                        validate=lambda key, fields: self.workflow.validate(fields))

    @cached_property
    def storage(self) -> Storage:
        return self.settings.open_storage()

    @cached_property
    def predict(self) -> PredictClient:
        s = self.settings
        ca = Path(s.tf_tls_ca).read_bytes() if s.tf_tls_ca else None  # TF_TLS_CA is a path
        return PredictClient(f"{s.tf_host}:{s.tf_port}", timeout=s.grpc_timeout,
                             max_retry=s.max_retry, backoff=Backoff(base=0.1, cap=s.grpc_backoff),
                             tls=s.tf_tls, root_certificates=ca,
                             redis=self.redis, metadata_expire=s.metadata_expire_time)

    @cached_property
    def workflow(self) -> Workflow:
        return get_workflow(self.settings.consumer_type, self.settings)

    @cached_property
    def describe(self) -> ModelDescriber:
        return MetadataDescriber(self.predict)


class MetadataDescriber(ModelDescriber):
    """Model shapes from GetModelMetadata (cached in Redis and in-process by the client)."""

    def __init__(self, client: PredictClient) -> None:
        self.client = client

    def __call__(self, model: ModelRef) -> ModelShape:
        try:
            meta = self.client.get_model_metadata(model.name, model.version)
        except Exception as error:
            raise JobError(f"model {model} is not available on the model server: "
                           f"{error}") from error
        if len(meta.inputs) != 1:
            raise JobError(f"model {model} has {len(meta.inputs)} inputs; "
                           "image workflows need exactly one")
        spec = meta.inputs[0]
        shape = tuple(spec.shape)
        if len(shape) != 4 or shape[1] <= 0 or shape[2] <= 0:
            raise JobError(f"model {model} input shape {shape} is not (batch, x, y, channels) "
                           "with a fixed tile size")
        return ModelShape(input_name=spec.name, tile_shape=(shape[1], shape[2]),
                          channels=shape[3], dtype=str(spec.dtype))
