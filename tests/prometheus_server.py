"""Debian's real `prometheus` (and `prometheus-node-exporter`) on 127.0.0.1 with free ports, for tests.

`start_prometheus(workdir, jobs)` writes a scrape config ({job: "host:port"}, 1 s interval), starts the server
and returns once /-/ready answers; `query(url, promql)` returns the instant vector from the HTTP API.
"""

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@contextmanager
def running(args: list[str], ready_url: str, log: Path):
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(ready_url, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def start_prometheus(workdir: Path, jobs: dict[str, str]):
    """Prometheus scraping each {job name: host:port} every second; yields its base URL."""
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
              "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                 for job, target in jobs.items()]}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    args = ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}"]
    with running(args, f"{url}/-/ready", workdir / "prometheus.log"):
        yield url


@contextmanager
def start_node_exporter(workdir: Path, textfile_dir: Path):
    """node-exporter with only its textfile collector, reading `textfile_dir`; yields host:port."""
    port = free_port()
    args = ["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
            "--collector.textfile", f"--collector.textfile.directory={textfile_dir}"]
    with running(args, f"http://127.0.0.1:{port}/metrics", workdir / "node-exporter.log"):
        yield f"127.0.0.1:{port}"


def query(url: str, promql: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for_series(url: str, promql: str, want: int, timeout_s: float = 60.0) -> list[dict]:
    """Poll until `promql` returns at least `want` series (scrapes run every second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(url, promql)
        if len(result) >= want or time.monotonic() > deadline:
            return result
        time.sleep(0.5)
