"""Prometheus metrics of one dashboard app: request latency per route, submissions by outcome, MLflow latency.

Each app owns its registry (tests build several apps in one process); /metrics serves it."""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class DashboardMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram("alignlab_dashboard_request_seconds", "HTTP request latency by route template",
                                  ["route", "method", "status"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.submissions = Counter("alignlab_dashboard_submissions_total", "Ablation submissions by outcome",
                                   ["target", "outcome"], registry=self.registry)
        self.mlflow = Histogram("alignlab_dashboard_mlflow_query_seconds", "MLflow query latency by query",
                                ["query"], registry=self.registry, buckets=LATENCY_BUCKETS)

    @contextmanager
    def mlflow_query(self, query: str):
        """Time one MLflow call (also when it raises)."""
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.mlflow.labels(query).observe(time.perf_counter() - tic)
