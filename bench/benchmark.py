"""Benchmark the pipeline on docker workers against a process-worker baseline, in one session.

    .venv/bin/python bench/benchmark.py                    # make bench
    .venv/bin/python bench/benchmark.py --runs 1 --concurrency 1 --redeploys 1   # smoke

It brings up the stack plus the baseline (bench/compose.baseline.yml), deploys both designs,
warms each up with one run, then measures, alternating the designs run by run:
- latency: trigger to Completed of one pipeline run (server timestamps), and the hops of both
  runs: scheduled->pending, pending->running, running->completed, and the parent's wait after
  its child completed;
- throughput: N pipeline runs created at once, wall time until all are final, all correct;
- redeploy (docker only): `prefect deploy --name subflow` after a one-line change.
Prints medians with min-max and the docker/process ratio; writes JSON to --out.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "10")  # as the flows and workers do

from prefect.client.orchestration import SyncPrefectClient  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
)

ROOT = Path(__file__).resolve().parent.parent
API_URL = "http://127.0.0.1:4200/api"
COMPOSE = ["docker", "compose", "-f", "docker-compose.yml", "-f", "bench/compose.baseline.yml"]
DESIGNS = {"docker": "main-flow/main", "process": "main-flow/main-process"}


def env() -> dict[str, str]:
    lines = (ROOT / ".env").read_text().splitlines()
    pins = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {**os.environ, **pins, "PREFECT_API_URL": API_URL}


def run(*args: str, cwd: Path = ROOT) -> None:
    subprocess.run(args, cwd=cwd, env=env(), check=True, capture_output=True, text=True)


def setup() -> None:
    """Stack plus baseline up, both designs deployed."""
    run(*COMPOSE, "up", "-d", "--build", "--wait")
    cli = [*COMPOSE, "run", "--rm", "-T", "cli", "prefect"]
    run(*cli, "deploy", "--all")
    run(*cli, "deploy", "--prefect-file", "bench/prefect.yaml", "--all")
    # The same concurrency limits as the docker pools (docker-compose.yml, `pools`).
    limits = {"flow-process-pool": "FLOW_POOL_LIMIT", "subflow-process-pool": "SUBFLOW_POOL_LIMIT"}
    for pool, variable in limits.items():
        run(*cli, "work-pool", "set-concurrency-limit", pool, os.environ.get(variable, "10"))


def timestamps(client: SyncPrefectClient, run_id: Any) -> dict[str, float]:
    """First time the run entered each state type, in epoch seconds (server clock)."""
    seen: dict[str, float] = {}
    for state in sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp):
        seen.setdefault(state.type.value, state.timestamp.timestamp())
    return seen


def start(client: SyncPrefectClient, design: str, n: int) -> list[Any]:
    deployment = client.read_deployment_by_name(DESIGNS[design])
    return [client.create_flow_run_from_deployment(deployment.id).id for _ in range(n)]


def wait(client: SyncPrefectClient, run_ids: list[Any], timeout: float = 900) -> list[Any]:
    """Poll until every run is final; the runs."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [client.read_flow_run(run_id) for run_id in run_ids]
        if all(r.state.is_final() for r in runs):
            return runs
        if time.monotonic() > deadline:
            sys.exit(f"runs still not final after {timeout}s: {[r.state.name for r in runs]}")
        time.sleep(0.2)


def child(client: SyncPrefectClient, run_id: Any) -> Any:
    (found,) = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])
        )
    )
    return found


def correct(client: SyncPrefectClient, run: Any) -> bool:
    """Completed, with a completed child whose Variable holds the three Iris groups."""
    if not run.state.is_completed():
        return False
    sub = child(client, run.id)
    variable = client.read_variable_by_name(f"subflow-output-{sub.id}")
    return sub.state.is_completed() and variable is not None and len(variable.value) == 3


def latency(client: SyncPrefectClient, design: str) -> dict[str, float]:
    """One pipeline run: total and per-hop seconds."""
    (run_id,) = start(client, design, 1)
    (main,) = wait(client, [run_id])
    assert correct(client, main), main.state
    sub = child(client, run_id)
    m, c = timestamps(client, main.id), timestamps(client, sub.id)
    return {
        "total": m["COMPLETED"] - m["SCHEDULED"],
        "main scheduled->pending": m["PENDING"] - m["SCHEDULED"],
        "main pending->running": m["RUNNING"] - m["PENDING"],
        "main running->completed": m["COMPLETED"] - m["RUNNING"],
        "sub scheduled->pending": c["PENDING"] - c["SCHEDULED"],
        "sub pending->running": c["RUNNING"] - c["PENDING"],
        "sub running->completed": c["COMPLETED"] - c["RUNNING"],
        "main wait after sub completed": m["COMPLETED"] - c["COMPLETED"],
    }


def throughput(client: SyncPrefectClient, design: str, n: int) -> dict[str, float]:
    started = time.monotonic()
    runs = wait(client, start(client, design, n))
    wall = time.monotonic() - started
    return {"wall": wall, "correct": sum(correct(client, r) for r in runs), "runs": n}


def redeploy_seconds() -> float:
    """`prefect deploy --name subflow` after a one-line change, from a copy of the project."""
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        shutil.copy(ROOT / ".env", project)
        shutil.copy(ROOT / "prefect.yaml", project)
        for component in ("main_flow", "subflow"):
            shutil.copytree(ROOT / component, project / component)
        code = project / "subflow" / "subflow.py"
        code.write_text(code.read_text() + f"\n# benchmark change {time.time_ns()}\n")
        started = time.monotonic()
        run(
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deploy",
            "--name",
            "subflow",
            cwd=project,
        )
        return time.monotonic() - started


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="latency runs per design")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[10, 20])
    parser.add_argument("--redeploys", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--skip-setup", action="store_true", help="stack already up and deployed")
    args = parser.parse_args()

    if not args.skip_setup:
        setup()
    results: dict[str, Any] = {"latency": {}, "throughput": {}, "redeploy": None}
    with SyncPrefectClient(API_URL) as client:
        for design in DESIGNS:
            latency(client, design)  # warm-up: first image pull, caches
        samples: dict[str, list[dict[str, float]]] = {design: [] for design in DESIGNS}
        for _ in range(args.runs):
            for design in DESIGNS:
                samples[design].append(latency(client, design))
        for design, runs in samples.items():
            results["latency"][design] = {k: spread([r[k] for r in runs]) for k in runs[0]}
        args.out.write_text(json.dumps(results, indent=2))  # partial results survive a failure
        for n in args.concurrency:
            results["throughput"][n] = {d: throughput(client, d, n) for d in DESIGNS}
            args.out.write_text(json.dumps(results, indent=2))
    try:
        results["redeploy"] = spread([redeploy_seconds() for _ in range(args.redeploys)])
    finally:
        run(*COMPOSE, "run", "--rm", "-T", "cli", "prefect", "deploy", "--name", "subflow")
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nresults: {args.out}")


def table(results: dict[str, Any]) -> str:
    """The results as a markdown table: medians (min-max) and the docker/process ratio."""
    rows = ["| figure | docker | process | docker/process |", "| --- | --- | --- | --- |"]
    lat = results["latency"]
    for key in lat["docker"]:
        d, p = lat["docker"][key], lat["process"][key]
        ratio = d["median"] / p["median"] if p["median"] > 0 else float("nan")
        rows.append(f"| {key} (s) | {fmt(d)} | {fmt(p)} | {ratio:.2f} |")
    for n, by_design in results["throughput"].items():
        d, p = by_design["docker"], by_design["process"]
        rows.append(
            f"| {n} runs at once: wall (s), correct | {d['wall']:.1f}, {d['correct']}/{n} "
            f"| {p['wall']:.1f}, {p['correct']}/{n} | {d['wall'] / p['wall']:.2f} |"
        )
    rows.append(
        f"| redeploy subflow after a one-line change (s) | {fmt(results['redeploy'])} | n/a | |"
    )
    return "\n".join(rows)


def fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


if __name__ == "__main__":
    main()
