"""Load on the dashboard: 50 simulated users against the compare page and its API, for a bounded time.

    python benchmarks/dashboard_load.py [--users 50] [--seconds 20] [--runs 50] [--steps 2000] [--folder DIR]

Seeds a real MLflow server (SQLite, on 127.0.0.1) with one ablation of `--runs` runs (5 arms x 10 seeds),
each with `--steps` logged steps of `loss` and `lr` plus final metrics, starts the dashboard in its own
process (uvicorn, one worker, auth on with a viewer token), times the compare page's requests once cold
(server time, empty caches), then lets `--users` concurrent users loop over: the compare page HTML, the
compare API (final summary), the loss curves and the ablations API. Prints p50 / p95 / max per request kind
and the error count. The seeded store is kept in `--folder` to rerun against (a second run skips seeding).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ABLATION = "load-test"
HERE = Path(__file__).resolve().parent.parent
APP = """
import sys, uvicorn
from alignlab_dashboard import DashboardSettings, create_app
settings = DashboardSettings(tracking_uri=sys.argv[1], tokens_file=sys.argv[2], specs_dir=sys.argv[3])
uvicorn.run(create_app(settings, workdir=sys.argv[3]), host="127.0.0.1", port=int(sys.argv[4]), log_level="warning")
"""


def seed_store(uri: str, runs: int, steps: int) -> None:
    """`runs` FINISHED runs tagged like alignlab's (5 arms, seeds 0..), `steps` steps of loss and lr each."""
    import random

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment(ABLATION)
    now = int(time.time() * 1000)
    for index in range(runs):
        arm, seed = f"arm-{index % 5}", index // 5
        run = client.create_run(experiment, run_name=f"{arm}/seed-{seed}",
                                tags={"alignlab.ablation": ABLATION, "alignlab.arm": arm, "alignlab.seed": str(seed)})
        rng = random.Random(index)
        offset = 0.05 * (index % 5)
        metrics = []
        for step in range(steps):
            loss = 4.0 * (1 + step) ** -0.3 - offset + rng.gauss(0, 0.02)
            metrics += [Metric("loss", loss, now + step, step),
                        Metric("lr", 1e-3 * (1 - step / steps), now + step, step)]
        metrics += [Metric("final_loss", metrics[-2].value, now, steps),
                    Metric("retrieval/mean_R1", 0.3 + offset + rng.gauss(0, 0.01), now, steps)]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000])
        client.log_param(run.info.run_id, "train.lr", str(1e-3 * (1 + index % 5)))
        client.set_terminated(run.info.run_id, "FINISHED")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_up(client, url: str) -> None:
    for _ in range(600):
        try:
            if (await client.get(f"{url}/healthz")).status_code == 200:
                return
        except Exception:  # not listening yet
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the dashboard at {url} did not start")


REQUESTS = {
    "compare page": f"/ablations/{ABLATION}",
    "compare API": f"/api/ablations/{ABLATION}/compare?summary=final",
    "curves API": f"/api/ablations/{ABLATION}/curves?metric=loss&x=step",
    "ablations API": "/api/ablations",
}


async def user(client, url: str, until: float, timings: dict, errors: list) -> None:
    while time.monotonic() < until:
        for kind, path in REQUESTS.items():
            tic = time.perf_counter()
            try:
                response = await client.get(url + path)
                if response.status_code != 200:
                    errors.append(f"{kind}: HTTP {response.status_code}")
            except Exception as err:  # a refused or reset connection counts as an error
                errors.append(f"{kind}: {type(err).__name__}")
                continue
            timings.setdefault(kind, []).append(time.perf_counter() - tic)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def drive(url: str, token: str, users: int, seconds: float) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:
        await wait_up(client, url)
        print("cold (empty caches, one request each):")
        for kind, path in REQUESTS.items():
            tic = time.perf_counter()
            response = await client.get(url + path)
            print(f"  {kind:14s} {1000 * (time.perf_counter() - tic):7.1f} ms  HTTP {response.status_code}")
        timings, errors = {}, []
        until = time.monotonic() + seconds
        await asyncio.gather(*(user(client, url, until, timings, errors) for _ in range(users)))
        server = server_times((await client.get(f"{url}/metrics")).text)
    total = sum(len(v) for v in timings.values())
    print(f"\n{users} users for {seconds:.0f} s: {total} requests ({total / seconds:.0f}/s), {len(errors)} errors")
    for kind, values in timings.items():
        print(f"  {kind:14s} n={len(values):5d}  p50 {1000 * percentile(values, 50):7.1f} ms  "
              f"p95 {1000 * percentile(values, 95):7.1f} ms  max {1000 * max(values):7.1f} ms")
    print("server time per request (the app's own latency histogram, mean over the whole run):")
    for route, (count, seconds) in sorted(server.items()):
        print(f"  {route:40s} n={count:6.0f}  mean {1000 * seconds / count:7.1f} ms")
    if errors:
        print("first errors:", errors[:5])


def server_times(metrics_text: str) -> dict[str, tuple[float, float]]:
    """route -> (count, seconds) of GET 200 requests from the dashboard's /metrics."""
    out: dict[str, list[float]] = {}
    for line in metrics_text.splitlines():
        for suffix, index in (("_count{", 0), ("_sum{", 1)):
            if line.startswith("alignlab_dashboard_request_seconds" + suffix) and 'status="200"' in line:
                route = line.split('route="')[1].split('"')[0]
                out.setdefault(route, [0.0, 0.0])[index] += float(line.rsplit(" ", 1)[1])
    return {route: (count, seconds) for route, (count, seconds) in out.items() if count}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "alignlab-dashboard-load")
    args = parser.parse_args()
    from alignlab_components.mlflow_server import start_mlflow_server
    from alignlab_dashboard.auth import add_token

    args.folder.mkdir(parents=True, exist_ok=True)
    fresh = not (args.folder / "mlflow.db").exists()
    server = start_mlflow_server(f"sqlite:///{args.folder / 'mlflow.db'}", str(args.folder / "artifacts"),
                                 args.folder / "mlflow.log")
    dashboard = None
    try:
        if fresh:
            tic = time.perf_counter()
            seed_store(server.url, args.runs, args.steps)
            print(f"seeded {args.runs} runs x {args.steps} steps in {time.perf_counter() - tic:.0f} s")
        (args.folder / "tokens.yaml").unlink(missing_ok=True)
        token = add_token(args.folder / "tokens.yaml", "load", "viewer")
        port = free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(HERE / d) for d in ("platform", "components", "pipelines", "services")]
            + [os.environ.get("PYTHONPATH", "")])}
        dashboard = subprocess.Popen([sys.executable, "-c", APP, server.url, str(args.folder / "tokens.yaml"),
                                      str(args.folder), str(port)], env=env)
        asyncio.run(drive(f"http://127.0.0.1:{port}", token, args.users, args.seconds))
    finally:
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(30)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
