"""Training progress as Prometheus gauges: a Pushgateway (batch jobs on a cluster), a node-exporter textfile,
or an HTTP port to scrape, chosen by `tracking.prometheus` (`PrometheusConfig`); off by default.

Gauges (one fresh registry per run, labelled `run`; rank 0 only):
    alignlab_train_step, alignlab_train_step_seconds, alignlab_train_samples_per_second, alignlab_train_loss,
    alignlab_train_logit_scale, alignlab_train_learning_rate, alignlab_train_data_wait_seconds,
    alignlab_train_gpu_memory_allocated_bytes / _max_allocated_bytes (CUDA only),
    alignlab_train_last_step_timestamp_seconds, alignlab_train_running (1 while training, 0 after the last step)
The chart's PrometheusRule `AlignlabTrainingStalled` reads the last two. Pushes and textfile writes are
throttled to `every_s` and never stop training: a failure is reported once as a warning.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, start_http_server, write_to_textfile

from alignlab.config import PrometheusConfig

PUSHGATEWAY_ENV = "ALIGNLAB_PUSHGATEWAY"  # set by the Helm chart's ConfigMap for every pipeline step
GAUGES = {  # record key -> (metric name, help)
    "step": ("alignlab_train_step", "Optimizer steps done"),
    "step_time": ("alignlab_train_step_seconds", "Wall time of the last optimizer step"),
    "loss": ("alignlab_train_loss", "Training loss of the last step (mean over ranks)"),
    "logit_scale": ("alignlab_train_logit_scale", "Contrastive logit scale (temperature inverse) after the last step"),
    "lr": ("alignlab_train_learning_rate", "Learning rate of the last step"),
}


class TrainingExporter:
    """Holds the gauges of one training run and ships them where the config says."""

    def __init__(self, config: PrometheusConfig, run: str, global_batch_size: int, device: torch.device):
        self.config = config
        self.run = run
        self.batch_size = global_batch_size
        self.device = device
        self.pushgateway = config.pushgateway or os.environ.get(PUSHGATEWAY_ENV) or None
        self.registry = CollectorRegistry()
        gauge = lambda name, text: Gauge(name, text, ["run"], registry=self.registry).labels(run)  # noqa: E731
        self.gauges = {key: gauge(name, text) for key, (name, text) in GAUGES.items()}
        self.samples = gauge("alignlab_train_samples_per_second", "Training samples per second (all ranks)")
        self.data_wait = gauge("alignlab_train_data_wait_seconds", "Time the last step waited for the data loader")
        self.last_step = gauge("alignlab_train_last_step_timestamp_seconds", "Unix time of the last finished step")
        self.running = gauge("alignlab_train_running", "1 while the run trains, 0 once it finished")
        self.gpu = None
        if device.type == "cuda":
            self.gpu = (gauge("alignlab_train_gpu_memory_allocated_bytes", "CUDA memory held by tensors"),
                        gauge("alignlab_train_gpu_memory_max_allocated_bytes", "Peak CUDA memory held by tensors"))
        self.server = None
        if config.port is not None:
            self.server, _ = start_http_server(config.port, addr=config.host, registry=self.registry)
        self.running.set(1)
        self.last_sent = 0.0
        self.failed: set[str] = set()
        self.ship(force=True)

    def observe(self, record: dict, data_wait_s: float) -> None:
        """One finished step: `record` is the trainer's per-step record (step, step_time, loss, logit_scale, lr)."""
        for key, gauge in self.gauges.items():
            if key in record:
                gauge.set(float(record[key]))
        if record.get("step_time"):
            self.samples.set(self.batch_size / record["step_time"])
        self.data_wait.set(data_wait_s)
        self.last_step.set(time.time())
        if self.gpu is not None:
            self.gpu[0].set(torch.cuda.memory_allocated(self.device))
            self.gpu[1].set(torch.cuda.max_memory_allocated(self.device))
        self.ship()

    def close(self) -> None:
        """The run finished: running 0, a last push / write, the port closed."""
        self.running.set(0)
        self.ship(force=True)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def ship(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_sent < self.config.every_s:
            return
        self.last_sent = now
        if self.config.textfile:
            self._try("textfile", lambda: write_to_textfile(str(self.config.textfile), self.registry))
        if self.pushgateway:
            self._try("pushgateway", lambda: push_to_gateway(self.pushgateway, job=self.config.job,
                                                             registry=self.registry, grouping_key={"run": self.run},
                                                             timeout=5))

    def _try(self, where: str, action) -> None:
        try:
            action()
        except Exception as err:  # metrics must never stop a training run
            if where not in self.failed:
                self.failed.add(where)
                warnings.warn(f"Prometheus {where} export failed ({err}); training goes on, later failures are "
                              f"not reported", RuntimeWarning, stacklevel=2)


def training_exporter(config: PrometheusConfig, run: str, global_batch_size: int, device: torch.device,
                      is_main: bool) -> TrainingExporter | None:
    """The run's exporter, or None when no target is configured (nor $ALIGNLAB_PUSHGATEWAY set) or not rank 0."""
    wanted = config.textfile or config.port is not None or config.pushgateway or os.environ.get(PUSHGATEWAY_ENV)
    if not (is_main and wanted):
        return None
    if config.textfile:
        Path(config.textfile).parent.mkdir(parents=True, exist_ok=True)
    return TrainingExporter(config, run, global_batch_size, device)
