"""What the supervisor measures: per-stage busy time, jobs, latency, batches; Prometheus.

The same figures feed `/metrics`, the periodic log line and `kiosk-pipeline bench`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from kiosk_pipeline.pipeline.inference import InferenceStats
    from kiosk_pipeline.pipeline.supervisor import Supervisor


@dataclass
class Sample:
    """Cumulative figures at one instant; the bench plots differences between samples."""

    at: float
    busy: dict[str, float]
    server_tiles: int
    requests: int
    inference_busy: float
    in_flight: int


@dataclass
class PipelineMetrics:
    busy_seconds: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    latencies: list[tuple[float, float]] = field(default_factory=list)
    timeline: list[Sample] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry()
        self._jobs = Counter("kiosk_pipeline_jobs", "Jobs finished, by outcome", ["outcome"],
                             registry=self.registry)
        self._claimed = Counter("kiosk_pipeline_jobs_claimed", "Jobs claimed from Redis",
                                registry=self.registry)
        self._busy = Counter("kiosk_pipeline_stage_busy_seconds",
                             "Seconds stage processes spent working", ["stage"],
                             registry=self.registry)
        self._restarts = Counter("kiosk_pipeline_stage_restarts",
                                 "Stage processes restarted after dying", ["stage"],
                                 registry=self.registry)
        self._latency = Histogram("kiosk_pipeline_job_seconds", "Claim-to-result time",
                                  buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
                                  registry=self.registry)
        self._in_flight = Gauge("kiosk_pipeline_jobs_in_flight", "Jobs held by this worker",
                                registry=self.registry)
        self._queued = Gauge("kiosk_pipeline_stage_queue", "Jobs waiting for a stage",
                             ["stage"], registry=self.registry)
        self._tiles = Gauge("kiosk_pipeline_tiles_predicted", "Tiles sent to the model server",
                            registry=self.registry)
        self._fill = Gauge("kiosk_pipeline_batch_fill", "Mean tiles per request / max batch",
                           registry=self.registry)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def claimed(self) -> None:
        self._claimed.inc()

    def busy(self, stage: str, seconds: float) -> None:
        self.busy_seconds[stage] = self.busy_seconds.get(stage, 0.0) + seconds
        self.tasks[stage] = self.tasks.get(stage, 0) + 1
        self._busy.labels(stage).inc(seconds)

    def restarted(self, stage: str) -> None:
        self._restarts.labels(stage).inc()

    def finished(self, outcome: str, latency: float) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.latencies.append((time.perf_counter(), latency))
        self._jobs.labels(outcome).inc()
        self._latency.observe(latency)

    def inference_reported(self, stats: InferenceStats) -> None:
        self._tiles.set(stats.tiles)
        if stats.requests:
            self._fill.set(stats.fill_sum / stats.requests)

    def sample(self, supervisor: Supervisor) -> None:
        stats = supervisor.inference_stats
        self._in_flight.set(len(supervisor.ledger))
        self._queued.labels("fetch").set(len(supervisor.fetch_queue))
        self._queued.labels("post").set(len(supervisor.post_queue))
        self.timeline.append(Sample(time.perf_counter(), dict(self.busy_seconds), stats.tiles,
                                    stats.requests, stats.busy_seconds, len(supervisor.ledger)))
