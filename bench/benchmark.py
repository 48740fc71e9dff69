"""Benchmark the pipeline on Docker workers against a process-worker baseline, on a stack of its own.

    .venv/bin/python bench/benchmark.py            # make bench: every figure (about 40 minutes on 2 cores)
    .venv/bin/python bench/benchmark.py --smoke    # one run of each figure, small (CI)
    .venv/bin/python bench/benchmark.py --stages latency cpu --before <git ref>   # before/after

The stack is a compose project of its own (tests/harness.py), plus the baseline: the same
components on process workers (bench/compose.baseline.yml, bench/prefect.yaml). Figures:

  floor       per component image: `docker run IMAGE true`, and a fresh container importing
              prefect.engine and the component's module (its heavy imports); the pipeline's floor
              is the three serial hops' sum
  cached      trigger to completed of a fully cached pipeline run (no step container), against
              the main flow's own floor
  latency     trigger to completed of one pipeline run and its hops, designs alternating run by
              run; ratios to the floor and to the process baseline; with --before REF, also
              the main flow as of git REF, for a before/after in one run (latency, cpu, throughput)
  cpu         CPU-seconds per pipeline run, --runs one at a time and --runs at once: flow
              processes (each reports its own), workers, server, Postgres (cgroup accounting
              through the Docker API), dockerd and containerd; and the stack's idle CPU per second
  polling     latency and the server's idle CPU at other worker query intervals (--intervals)
  sizes       1k to 10M random rows over HTTP, file and S3 store (docker design): trigger to
              completed and each flow container's peak memory; a chart, bench/sizes.png
  formats     1M rows as CSV (the baseline), gzip CSV and Parquet over HTTP, runs alternating
              format by format: trigger to completed and the main flow's peak memory
  mapped      validate mapped over 1, 2 and 4 partitions of 10M and 50M rows (one CPU per flow
              container, as always), then subflow: the step's wall time and the speedup, every summary the
              same; the same on 1,000 rows, where a partition does almost no work, is what
              partitions cost; a chart, bench/mapped.png
  throughput  N pipeline runs created at once: wall time, all correct, 503s in the server log
  redeploy    `prefect deploy --name subflow` after a one-line change

Prints medians (min-max) and ratios as markdown tables, and writes every sample to --out.
"""

import argparse
import gzip
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / d) for d in ("", "tests")]  # the kit, the harness
import docker  # noqa: E402
from harness import (  # noqa: E402
    PREFECT,
    ROOT,
    S3_KEYS,
    SETTINGS,
    Stack,
    expected_summary,
    iris_like,
    project_copy,
    write_csv,
)
from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolUpdate  # noqa: E402

DESIGNS = {"docker": "main-flow/main", "process": "main-flow/main-process"}
BEFORE = {}  # with --before REF: {"before": "main-flow/before"}, the main flow as of git REF
POOLS = {
    "BASELINE_FLOW_POOL": "flow-process",
    "BASELINE_VALIDATE_POOL": "validate-process",
    "BASELINE_SUBFLOW_POOL": "subflow-process",
}
# Each component: its deployment and its flow module (what a flow-run container imports).
COMPONENTS = {
    "main_flow": ("main-flow/main", "main_flow.main_flow"),
    "validate": ("validate/validate", "validate.validate"),
    "subflow": ("subflow/subflow", "subflow.subflow"),
}
STEPS = ("validate", "subflow")
DATA = Path(tempfile.mkdtemp(prefix="bench-data-"))
BENCH = Stack(
    "modular-pipeline-bench",
    prefect_port=34200,
    registry_port=35000,
    s3_port=39000,
    extra_files=("bench/compose.baseline.yml",),
    overrides={"SOURCE_ALLOW": "http://testdata:8000/", "TEST_DATA": str(DATA), **POOLS},
)
S3_STORE = {"AWS_ENDPOINT_URL": "http://s3:9000", **S3_KEYS}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


# --- setup ---------------------------------------------------------------------------------------


def setup() -> None:
    """The benchmark's stack and baseline up, both designs deployed, the same limits on all pools."""
    DATA.chmod(0o755)
    BENCH.down()
    BENCH.up()
    BENCH.deploy()
    BENCH.sh(PREFECT, "--no-prompt", "deploy", "--prefect-file", "bench/prefect.yaml", "--all")
    with BENCH.api() as client:
        docker_validate = client.read_deployment_by_name("validate/validate")
        process_validate = client.read_deployment_by_name("validate/validate-process")
        client.update_deployment(process_validate.id, DeploymentUpdate(parameters=docker_validate.parameters))
        limits = {SETTINGS["FLOW_POOL_LIMIT"]: [POOLS["BASELINE_FLOW_POOL"]]}
        limits[SETTINGS["SUBFLOW_POOL_LIMIT"]] = [
            POOLS["BASELINE_VALIDATE_POOL"],
            POOLS["BASELINE_SUBFLOW_POOL"],
        ]
        for limit, pools in limits.items():
            for pool in pools:
                client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=int(limit)))


def deploy_before(ref: str) -> None:
    """The main flow as of git `ref` (today's steps and pools), deployed beside today's as main-flow/before."""
    with tempfile.TemporaryDirectory() as tmp:
        project = project_copy(Path(tmp))
        archive = subprocess.run(["git", "archive", ref, "main_flow"], cwd=ROOT, capture_output=True, check=True)
        shutil.rmtree(project / "main_flow")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(project, filter="data")
        config = project / "prefect.yaml"
        config.write_text(config.read_text().replace("    name: main\n", "    name: before\n", 1))
        BENCH.deploy("before", cwd=project)
    BEFORE["before"] = "main-flow/before"


def serve(name: str, rows: int) -> str:
    """`rows` random Iris-like rows on the stack's test data server; their URL."""
    if not (DATA / name).exists():
        write_csv(iris_like(rows, seed=rows), DATA / name)
    return f"http://testdata:8000/{name}"


def served_as(rows: int, form: str) -> str:
    """The rows of serve(rows) as `form` (csv, csv.gz or parquet) on the test data server; their URL."""
    url = serve(f"rows{rows}.csv", rows)
    path = DATA / f"rows{rows}.{form}"
    if not path.exists():
        plain = DATA / f"rows{rows}.csv"
        if form == "csv.gz":
            path.write_bytes(gzip.compress(plain.read_bytes()))
        else:  # the CSV's own column types, so every form gives the same summary
            pq.write_table(pacsv.read_csv(plain), path)
        path.chmod(0o644)
    return url.replace(".csv", f".{form}")


# --- floor ---------------------------------------------------------------------------------------


def timed(*args: str) -> float:
    started = time.monotonic()
    BENCH.sh(*args)
    return time.monotonic() - started


def floor(runs: int) -> dict[str, Any]:
    """Container start, and start plus the imports of the engine and the component, per image."""
    result = {}
    for component, (deployment, module) in COMPONENTS.items():
        image = BENCH.deployment(deployment).job_variables["image"]
        load = f"import sys; sys.path.insert(0, '/opt/prefect/pipeline'); import prefect.engine, {module}"
        result[component] = {
            "start": spread([timed("docker", "run", "--rm", "--entrypoint", "true", image) for _ in range(runs)]),
            "start+imports": spread(
                [timed("docker", "run", "--rm", "--entrypoint", "python", image, "-c", load) for _ in range(runs)]
            ),
        }
    result["pipeline"] = sum(v["start+imports"]["median"] for v in result.values())
    return result


# --- one run: latency, hops, costs ---------------------------------------------------------------


def timestamps(client: Any, run_id: Any) -> dict[str, float]:
    """First time the run entered each state type, in epoch seconds (server clock)."""
    seen: dict[str, float] = {}
    for state in sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp):
        seen.setdefault(state.type.value, state.timestamp.timestamp())
    return seen


def hops(run: Any) -> dict[str, float]:
    """Total and per-hop seconds of a finished pipeline run, from the server's state history."""
    with BENCH.api() as client:
        main = timestamps(client, run.id)
        children = {BENCH.flow_name(c): timestamps(client, c.id) for c in BENCH.children(run.id)}
    figures = {
        "trigger to completed": main["COMPLETED"] - main["SCHEDULED"],
        "main: scheduled to running": main["RUNNING"] - main["SCHEDULED"],
        "main: running to first step created": children[STEPS[0]]["SCHEDULED"] - main["RUNNING"],
    }
    for name in STEPS:
        step = children[name]
        figures[f"{name}: scheduled to pending"] = step["PENDING"] - step["SCHEDULED"]
        figures[f"{name}: pending to running"] = step["RUNNING"] - step["PENDING"]
        figures[f"{name}: running to completed"] = step["COMPLETED"] - step["RUNNING"]
    figures["between steps"] = children[STEPS[1]]["SCHEDULED"] - children[STEPS[0]]["COMPLETED"]
    figures["main: last step completed to completed"] = main["COMPLETED"] - children[STEPS[-1]]["COMPLETED"]
    return figures


def correct(run: Any, summary: list[dict[str, Any]] | None = None) -> bool:
    """Completed, and the stored output holds the expected groups (the shipped Iris by default)."""
    if not run.state.is_completed():
        return False
    (result,) = [r for name, r in BENCH.output(run)["results"].items() if name.startswith("subflow/")]
    if summary is None:
        return [g["count"] for g in result["summary"]] == [50, 50, 50]
    return [(g["species"], g["count"]) for g in result["summary"]] == [(g["species"], g["count"]) for g in summary]


def latency(runs: int, designs: dict[str, str] = DESIGNS, warm_up: bool = True) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {design: [] for design in designs}
    for deployment in designs.values() if warm_up else ():  # first image pulls, caches
        BENCH.run(deployment)
    for _ in range(runs):
        for design, deployment in designs.items():
            run = BENCH.run(deployment)
            assert correct(run), (design, run.state)
            samples[design].append(hops(run))
    return {design: {k: spread([s[k] for s in runs_]) for k in runs_[0]} for design, runs_ in samples.items()}


def cached(runs: int) -> dict[str, Any]:
    """Trigger to completed of a pipeline run whose every step is reused from the cache."""
    BENCH.run(DESIGNS["docker"], refresh=[])  # fills the cache if this stage runs alone; else already a hit
    samples = []
    for _ in range(runs):
        run = BENCH.run(DESIGNS["docker"], refresh=[])
        assert correct(run) and not BENCH.children(run.id) and len(BENCH.output(run)["cached"]) == 3, run.state
        with BENCH.api() as client:
            seen = timestamps(client, run.id)
        samples.append(
            {
                "trigger to completed": seen["COMPLETED"] - seen["SCHEDULED"],
                "main: running to completed": seen["COMPLETED"] - seen["RUNNING"],
            }
        )
    return {key: spread([s[key] for s in samples]) for key in samples[0]}


# --- CPU -----------------------------------------------------------------------------------------


def container_cpu() -> dict[str, float]:
    """Cumulative CPU-seconds of each long-lived container of the stack (cgroup accounting)."""
    client = docker.from_env()
    containers = client.containers.list(filters={"label": f"com.docker.compose.project={BENCH.project}"})
    # A stats call takes a second or two per container here, even one-shot: all at once, then.
    with ThreadPoolExecutor(10) as pool:  # docker-py's connection pool size
        stats = pool.map(lambda c: c.stats(stream=False, one_shot=True), containers)
    return {
        c.labels["com.docker.compose.service"]: s["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9
        for c, s in zip(containers, stats, strict=True)
    }


def daemon_cpu() -> float:
    """CPU-seconds of dockerd and containerd so far (they start every flow-run container)."""
    total = 0.0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() in (
                "dockerd",
                "containerd",
                "containerd-shim",
                "containerd-shim-runc-v2",
            ):
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total


SERVICES = {
    "docker": ["prefect-server", "postgres", "worker-flow", "worker-subflow"],
    "process": ["prefect-server", "postgres", *(f"process-{c}" for c in COMPONENTS)],
}
SERVICES["before"] = SERVICES["docker"]


def cpu(runs: int, idle_s: float = 30) -> dict[str, Any]:
    """CPU-seconds per pipeline run, by where it was spent: `runs` pipelines one at a time, then
    `runs` at once, each design in a block of its own. Plus what the stack burns idle, per second."""
    result: dict[str, Any] = {}
    for mode in ("one at a time", "at once"):
        for design, deployment in {**DESIGNS, **BEFORE}.items():
            before, daemon = container_cpu(), daemon_cpu()
            if mode == "at once":
                started = [BENCH.start(deployment).id for _ in range(runs)]
                outputs = [BENCH.output(BENCH.wait_final(run_id, timeout=3600)) for run_id in started]
            else:
                outputs = [BENCH.output(BENCH.run(deployment)) for _ in range(runs)]
            after, daemon = container_cpu(), daemon_cpu() - daemon
            per_run = {s: (after[s] - before[s]) / runs for s in SERVICES[design]}
            if design != "process":  # flow processes report their own; process flows are in their workers
                per_run["flow containers"] = statistics.mean(
                    o["cpu_seconds"] + sum(r["cpu_seconds"] for r in o["results"].values()) for o in outputs
                )
                per_run["dockerd and containerd"] = daemon / runs
            per_run["total"] = sum(per_run.values())
            result.setdefault(mode, {})[design] = per_run
    result["idle per second"] = idle_cpu(idle_s)
    return result


def idle_cpu(window_s: float) -> dict[str, float]:
    """CPU-seconds per second of every service, and of the Docker daemons, with no run anywhere."""
    before, daemon, started = container_cpu(), daemon_cpu(), time.monotonic()
    time.sleep(window_s)  # a measurement window, not a wait for anything
    after, daemon, elapsed = container_cpu(), daemon_cpu() - daemon, time.monotonic() - started
    idle = {s: (after[s] - before[s]) / elapsed for s in dict.fromkeys(SERVICES["docker"] + SERVICES["process"])}
    return {**idle, "dockerd and containerd": daemon / elapsed}


def polling(runs: int, intervals: list[float], idle_s: float = 30, warm_up: bool = True) -> dict[str, Any]:
    """The worker query interval's price: latency of both designs (all workers poll) and the
    server's idle CPU, at each interval besides .env's. The workers go back to .env's after."""
    workers = [*SERVICES["docker"][2:], *SERVICES["process"][2:]]
    result = {}
    try:
        for interval in intervals:
            BENCH.overrides["PREFECT_WORKER_QUERY_SECONDS"] = str(interval)
            BENCH.compose("up", "-d", "--wait", *workers, timeout=600)  # recreated with the new interval
            measured = latency(runs, warm_up=warm_up)
            result[str(interval)] = {design: measured[design]["trigger to completed"] for design in DESIGNS} | {
                "idle server CPU per second": idle_cpu(idle_s)["prefect-server"]
            }
    finally:
        BENCH.overrides.pop("PREFECT_WORKER_QUERY_SECONDS", None)
        BENCH.compose("up", "-d", "--wait", *workers, timeout=600)
    return result


# --- sizes, throughput, redeploy -----------------------------------------------------------------


def sizes(rows: list[int], runs: int, stores: list[str]) -> dict[str, Any]:
    """The docker design on growing inputs, in each storage mode: time and peak memory."""
    result: dict[str, Any] = {}
    for store in stores:
        if store == "s3":
            BENCH.use_store("s3://pipeline/data", **S3_STORE)
        for n in rows:
            url = serve(f"rows{n}.csv", n)
            expected = expected_summary(iris_like(n, seed=n)) if n <= 1_000_000 else None
            samples = []
            for _ in range(runs):
                run = BENCH.run(DESIGNS["docker"], source=url, timeout=3600)
                output = BENCH.output(run) if run.state.is_completed() else None
                samples.append(
                    {
                        "seconds": hops(run)["trigger to completed"] if output else None,
                        "correct": bool(output)
                        and (expected is None or correct(run, expected))
                        and output["input"]["rows"] == n,
                        "state": run.state.name,
                        "peak_mb": {
                            "main_flow": output["peak_rss_bytes"] / 2**20,
                            **{k.split("/")[0]: r["peak_rss_bytes"] / 2**20 for k, r in output["results"].items()},
                        }
                        if output
                        else {},
                        "csv_mb": (DATA / f"rows{n}.csv").stat().st_size / 2**20,
                        "parquet_mb": output["input"]["bytes"] / 2**20 if output else None,
                    }
                )
            result.setdefault(store, {})[n] = samples
    if "s3" in stores:  # back to the file store
        for name in S3_STORE:
            BENCH.overrides.pop(name)
        BENCH.use_store(SETTINGS["PIPELINE_DATA_URL"])
    return result


FORMS = ("csv", "csv.gz", "parquet")


def formats(rows: list[int], runs: int) -> dict[str, Any]:
    """The docker design on the same rows as CSV, gzip CSV and Parquet: what each form costs."""
    result: dict[str, Any] = {}
    for n in rows:
        expected = expected_summary(iris_like(n, seed=n))
        samples: dict[str, list[dict[str, Any]]] = {form: [] for form in FORMS}
        for _ in range(runs):
            for form in FORMS:  # alternating, so drift hits every form alike
                run = BENCH.run(DESIGNS["docker"], source=served_as(n, form), timeout=3600)
                output = BENCH.output(run) if run.state.is_completed() else None
                samples[form].append(
                    {
                        "seconds": hops(run)["trigger to completed"] if output else None,
                        "correct": correct(run, expected) and output["input"]["rows"] == n,
                        "main_peak_mb": output["peak_rss_bytes"] / 2**20 if output else None,
                    }
                )
        result[str(n)] = {
            form: {
                "source_mb": (DATA / f"rows{n}.{form}").stat().st_size / 2**20,
                "seconds": spread([s["seconds"] for s in got if s["seconds"] is not None] or [float("nan")]),
                "correct": sum(s["correct"] for s in got),
                "runs": len(got),
                "main_peak_mb": max((s["main_peak_mb"] for s in got if s["main_peak_mb"]), default=None),
            }
            for form, got in samples.items()
        }
    return result


def mapped(rows: list[int], partitions: list[int], runs: int) -> dict[str, Any]:
    """validate's wall time mapped over each number of `partitions`, then subflow, on each of
    `rows` rows and on 1,000 rows, runs alternating; each input ingested once, in max(partitions)
    parts, then replayed. Every run's summary must be the same, byte for byte (and the expected
    one up to 1M rows)."""
    result: dict[str, Any] = {}
    for n in dict.fromkeys([*rows, 1_000]):
        source = serve(f"rows{n}.csv", n)
        part_rows = -(-n // max(partitions))  # so that the input has max(partitions) parts
        ingested = BENCH.run(DESIGNS["docker"], source=source, steps=[], part_rows=part_rows, timeout=3600)
        assert ingested.state.is_completed(), ingested.state
        data, summaries = BENCH.output(ingested)["input"], set()
        expected = expected_summary(iris_like(n, seed=n)) if n <= 1_000_000 else None
        samples: dict[int, list[dict[str, float]]] = {p: [] for p in partitions}
        for _ in range(runs):
            for p in partitions:
                steps = [{"step": "validate/validate", "partitions": p}, "subflow/subflow"]
                run = BENCH.run(DESIGNS["docker"], data=data, steps=steps, timeout=3600)
                assert run.state.is_completed() and (expected is None or correct(run, expected)), run.state
                results = BENCH.output(run)["results"]
                step = results["validate/validate"]
                assert len(step["partitions"]) == p and step["output"]["rows"] == n, step["summary"]
                with BENCH.api() as client:  # where a partition's time goes: start (container, imports), work
                    seen = [timestamps(client, r["flow_run_id"]) for r in step["partitions"]]
                samples[p].append(
                    {
                        "seconds": step["seconds"],
                        "scheduled to running": max(t["RUNNING"] - t["SCHEDULED"] for t in seen),
                        "running to completed": max(t["COMPLETED"] - t["RUNNING"] for t in seen),
                    }
                )
                summaries.add(results["subflow/subflow"]["output"]["sha256"])
        assert len(summaries) == 1, f"{n} rows: the summary differs between partition counts"
        result[str(n)] = {str(p): {k: spread([x[k] for x in xs]) for k in xs[0]} for p, xs in samples.items()}
    return result


def server_503s(since: datetime) -> int:
    logs = BENCH.compose("logs", "--no-log-prefix", "--since", since.isoformat(), "prefect-server").stdout
    return sum(
        ("503" in line and "Service Unavailable" in line) or "database is locked" in line for line in logs.splitlines()
    )


def throughput(counts: list[int]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for n in counts:
        for design, deployment in {**DESIGNS, **BEFORE}.items():
            since = datetime.now(UTC)
            started = time.monotonic()
            runs = [BENCH.start(deployment).id for _ in range(n)]  # at once, through the API
            finished = [BENCH.wait_final(run_id, timeout=3600) for run_id in runs]
            wall = time.monotonic() - started
            result.setdefault(str(n), {})[design] = {
                "wall": wall,
                "correct": sum(correct(run) for run in finished),
                "runs": n,
                "503s": server_503s(since),
            }
    return result


def redeploy(runs: int) -> dict[str, float]:
    """`prefect deploy --name subflow` after a one-line change, from a copy of the project."""
    samples = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            project = project_copy(Path(tmp))
            code = project / "subflow" / "subflow.py"
            code.write_text(code.read_text() + f"\n# benchmark change {time.time_ns()}\n")
            samples.append(BENCH.deploy("subflow", cwd=project)[0])
    BENCH.deploy("subflow")
    return spread(samples)


# --- report --------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    lines = []
    if "floor" in results:
        fl = results["floor"]
        lines += [
            "| image | docker run true (s) | run + import engine and component (s) |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {c} | {fmt(fl[c]['start'])} | {fmt(fl[c]['start+imports'])} |" for c in COMPONENTS]
        lines += [f"| **pipeline floor** (three serial hops) | | **{fl['pipeline']:.2f}** |", ""]
    if "latency" in results:
        lat, floor_s = results["latency"], results.get("floor", {}).get("pipeline")
        lines += ["| figure (s) | docker | process | docker/process |", "| --- | --- | --- | --- |"]
        for key in lat["docker"]:
            d, p = lat["docker"][key], lat["process"][key]
            ratio = d["median"] / p["median"] if p["median"] > 0 else float("nan")
            lines.append(f"| {key} | {fmt(d)} | {fmt(p)} | {ratio:.2f} |")
        if floor_s:
            total = lat["docker"]["trigger to completed"]["median"]
            lines.append(f"| trigger to completed / floor | {total / floor_s:.2f} | | |")
        lines.append("")
    if "cached" in results:
        ca, fl = results["cached"], results.get("floor", {}).get("main_flow", {}).get("start+imports")
        uncached = results.get("latency", {}).get("docker", {}).get("trigger to completed")
        lines += ["| fully cached run (s) | docker |", "| --- | --- |"]
        lines += [f"| {key} | {fmt(value)} |" for key, value in ca.items()]
        if uncached:
            lines.append(f"| uncached: trigger to completed | {fmt(uncached)} |")
        if fl:
            lines.append(f"| main flow floor (run + imports) | {fmt(fl)} |")
            lines.append(f"| cached above the floor | {ca['trigger to completed']['median'] - fl['median']:.2f} |")
        lines.append("")
    if "before" in results.get("latency", {}):
        lat, ref = results["latency"], results["args"].get("before")
        lines += [f"| figure (s) | before ({ref}) | docker | docker/before |", "| --- | --- | --- | --- |"]
        for key in lat["docker"]:
            b, d = lat["before"][key], lat["docker"][key]
            ratio = d["median"] / b["median"] if b["median"] > 0 else float("nan")
            lines.append(f"| {key} | {fmt(b)} | {fmt(d)} | {ratio:.2f} |")
        lines.append("")
    if "cpu" in results:
        c = results["cpu"]
        one = c["one at a time"]
        columns = [(mode, d) for mode in c if mode != "idle per second" for d in c[mode]]
        lines += [
            "| CPU-seconds per pipeline run | " + " | ".join(f"{d}, {mode}" for mode, d in columns) + " |",
            "| --- " * (len(columns) + 1) + "|",
        ]
        keys = [k for k in dict.fromkeys(k for by in one.values() for k in by) if k != "total"] + ["total"]
        for key in keys:
            cells = [f"{c[mode][d][key]:.2f}" if key in c[mode][d] else "-" for mode, d in columns]
            lines.append(f"| {key} | {' | '.join(cells)} |")
        idle = ", ".join(f"{k} {v:.3f}" for k, v in c["idle per second"].items())
        lines += ["", f"idle, CPU-seconds per second: {idle}", ""]
    if "polling" in results:
        lines += [
            "| worker query interval (s) | trigger to completed: docker | process | idle server CPU/s |",
            "| --- | --- | --- | --- |",
        ]
        rows = dict(results["polling"])
        if "latency" in results and "cpu" in results:
            rows[SETTINGS["PREFECT_WORKER_QUERY_SECONDS"] + " (.env)"] = {
                **{d: results["latency"][d]["trigger to completed"] for d in DESIGNS},
                "idle server CPU per second": results["cpu"]["idle per second"]["prefect-server"],
            }
        for interval, row in sorted(rows.items(), key=lambda item: float(item[0].split()[0])):
            cells = f"{fmt(row['docker'])} | {fmt(row['process'])} | {row['idle server CPU per second']:.3f}"
            lines.append(f"| {interval} | {cells} |")
        lines.append("")
    if "throughput" in results:
        lines += ["| runs at once | docker: wall (s), correct, 503s | process: the same | docker/process |"]
        lines.append("| --- | --- | --- | --- |")
        for n, by in results["throughput"].items():
            d, p = by["docker"], by["process"]
            cells = [f"{x['wall']:.1f}, {x['correct']}/{n}, {x['503s']}" for x in (d, p)]
            lines.append(f"| {n} | {cells[0]} | {cells[1]} | {d['wall'] / p['wall']:.2f} |")
            if "before" in by:
                b = by["before"]
                lines.append(f"| {n}, before | {b['wall']:.1f}, {b['correct']}/{n}, {b['503s']} | | |")
        lines.append("")
    if "sizes" in results:
        lines += [
            "| rows | store | CSV, Parquet (MB) | trigger to completed (s) | peak MB: main, validate, subflow | ok |"
        ]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for store, by_rows in results["sizes"].items():
            for n, samples in by_rows.items():
                done = [s for s in samples if s["seconds"] is not None]
                seconds = fmt(spread([s["seconds"] for s in done]), 1) if done else "failed"
                peak = ", ".join(f"{max(s['peak_mb'][c] for s in done):.0f}" for c in COMPONENTS) if done else "-"
                mb = f"{done[0]['csv_mb']:.1f}, {done[0]['parquet_mb']:.1f}" if done else "-"
                ok = f"{sum(s['correct'] for s in samples)}/{len(samples)}"
                lines.append(f"| {int(n):,} | {store} | {mb} | {seconds} | {peak} | {ok} |")
        lines.append("")
    if "formats" in results:
        lines += [
            "| rows | source | source MB | trigger to completed (s) | vs CSV | main flow peak MB | ok |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for n, by_form in results["formats"].items():
            baseline = by_form["csv"]["seconds"]["median"]
            for form, f in by_form.items():
                ratio = f["seconds"]["median"] / baseline
                peak = f"{f['main_peak_mb']:.0f}" if f["main_peak_mb"] else "-"
                lines.append(
                    f"| {int(n):,} | {form} | {f['source_mb']:.1f} | {fmt(f['seconds'], 1)} | {ratio:.2f}x | {peak} "
                    f"| {f['correct']}/{f['runs']} |"
                )
        lines.append("")
    if "mapped" in results:
        by_rows = results["mapped"]
        sizes_ = sorted(by_rows, key=int, reverse=True)  # the smallest last: what partitions cost
        lines += [
            "| rows | partitions | validate wall (s) | speedup | slowest partition: to running, running (s) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for n in sizes_:
            for p, figures in by_rows[n].items():
                speedup = by_rows[n]["1"]["seconds"]["median"] / figures["seconds"]["median"]
                start, work = figures["scheduled to running"]["median"], figures["running to completed"]["median"]
                wall = fmt(figures["seconds"])
                lines.append(f"| {int(n):,} | {p} | {wall} | {speedup:.2f}x | {start:.2f}, {work:.2f} |")
        lines.append("")
    if results.get("redeploy"):
        lines.append(f"redeploy subflow after a one-line change: {fmt(results['redeploy'], 1)} s")
    return "\n".join(lines)


def chart(sizes_: dict[str, Any], path: Path) -> None:
    """Time and peak memory against rows, per store: bench/sizes.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for store, by_rows in sizes_.items():
        done = {int(n): [x for x in samples if x["seconds"]] for n, samples in by_rows.items()}
        rows = [n for n, d in done.items() if d]
        done = [done[n] for n in rows]
        left.plot(
            rows,
            [statistics.median(x["seconds"] for x in d) for d in done],
            marker="o",
            label=f"{store} store",
        )
        for component in COMPONENTS:
            right.plot(
                rows,
                [max(x["peak_mb"][component] for x in d) for d in done],
                marker="o",
                label=f"{component} ({store})",
            )
    left.set(xscale="log", yscale="log", xlabel="rows", ylabel="trigger to completed (s)", title="Pipeline time")
    right.set(xscale="log", xlabel="rows", ylabel="peak RSS (MB)", title="Peak memory per flow container")
    right.axhline(1024, color="grey", linestyle="--", linewidth=1, label="1 GB")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def mapped_chart(by_rows: dict[str, Any], path: Path) -> None:
    """Speedup and wall time against partitions: bench/mapped.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = [int(p) for p in next(iter(by_rows.values()))]
    seconds = {n: [by_rows[n][str(p)]["seconds"]["median"] for p in partitions] for n in sorted(by_rows, key=int)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, times in seconds.items():
        left.plot(partitions, [times[0] / t for t in times], marker="o", label=f"{int(n):,} rows")
        right.plot(partitions, times, marker="o", label=f"{int(n):,} rows")
    cores = os.cpu_count() or 1
    ideal = [min(p, cores) for p in partitions]
    left.plot(partitions, ideal, color="grey", linestyle="--", linewidth=1, label=f"ideal on {cores} cores")
    left.set(xlabel="partitions", ylabel="speedup of the mapped step", title="Speedup (one CPU per container)")
    right.set(xlabel="partitions", ylabel="validate wall time (s)", title="Mapped step wall time", ylim=(0, None))
    for axis in (left, right):
        axis.set_xticks(partitions)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


STAGES = ["floor", "latency", "cached", "cpu", "polling", "sizes", "formats", "mapped", "throughput", "redeploy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="latency and CPU runs per design")
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--size-runs", type=int, default=3)
    parser.add_argument("--stores", nargs="*", default=["file", "s3"], choices=["file", "s3"], help="sizes' stores")
    parser.add_argument("--format-rows", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--mapped-rows", type=int, nargs="*", default=[10_000_000, 50_000_000])
    parser.add_argument("--partitions", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--redeploys", type=int, default=3)
    parser.add_argument("--before", metavar="REF", help="also time the main flow as of this git ref")
    parser.add_argument("--stages", nargs="*", default=STAGES, choices=STAGES, help="the figures to measure")
    parser.add_argument("--intervals", type=float, nargs="*", default=[0.25, 1.0], help="worker query intervals")
    parser.add_argument("--smoke", action="store_true", help="one run of each figure, 1,000 rows, 2 at once")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--chart", type=Path, default=ROOT / "bench" / "sizes.png")
    parser.add_argument("--keep", action="store_true", help="leave the benchmark's stack up afterwards")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.rows, args.size_runs, args.concurrency, args.redeploys = 1, [1_000], 1, [2], 1
        args.mapped_rows, args.partitions, args.format_rows = [1_000], [1, 2], [1_000]
        args.stores = ["file"]  # the S3 store's own run is tests/test_storage.py's
        args.intervals = [1.0]

    setup()
    if args.before:
        deploy_before(args.before)
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    try:
        stages = [
            ("floor", lambda: floor(1 if args.smoke else max(args.runs, 3))),
            ("latency", lambda: latency(args.runs, {**DESIGNS, **BEFORE})),
            ("cached", lambda: cached(args.runs)),
            ("cpu", lambda: cpu(args.runs, idle_s=5 if args.smoke else 30)),
            # After the latency stage, images and caches are warm: no warm-up runs.
            (
                "polling",
                lambda: polling(args.runs, args.intervals, 5 if args.smoke else 30, "latency" not in args.stages),
            ),
            ("sizes", lambda: sizes(args.rows, args.size_runs, args.stores)),
            ("formats", lambda: formats(args.format_rows, args.size_runs)),
            ("mapped", lambda: mapped(args.mapped_rows, args.partitions, args.size_runs)),
            ("throughput", lambda: throughput(args.concurrency)),
            ("redeploy", lambda: redeploy(args.redeploys)),
        ]
        for name, stage in [(name, stage) for name, stage in stages if name in args.stages]:
            print(f"[bench] {name} ...", flush=True)
            started = time.monotonic()
            results[name] = stage()
            print(f"[bench] {name}: {time.monotonic() - started:.0f} s", flush=True)
            args.out.write_text(json.dumps(results, indent=2, default=str))  # what is done survives
        if "sizes" in results:
            chart(results["sizes"], args.chart)
        if "mapped" in results:
            mapped_chart(results["mapped"], args.chart.with_name("mapped.png"))
    finally:
        if not args.keep:
            BENCH.down()
    print(report(results))
    print(f"\nresults: {args.out}, charts: {args.chart}, {args.chart.with_name('mapped.png')}")


if __name__ == "__main__":
    main()
