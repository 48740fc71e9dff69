"""The benchmark's stages: each measures one figure of the pipeline, with the sizes and repeats of
a `Plan` (the full one, or the smoke's: each stage once, at its smallest size)."""

import concurrent.futures
import contextlib
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.objects import StateType
from prefect.states import State

from bench.measure import CpuMeter, correct, hops, idle_cpu, spread, timestamps, trigger_to_completed
from bench.stack import Bench
from tests.harness import RUN_DEADLINE, S3_KEYS, SETTINGS, expected_summary, iris_like, project_copy, wait_for

# Each component: its deployment and its flow module (what a flow-run container imports).
COMPONENTS = {
    "main_flow": ("main-flow/main", "main_flow.main_flow"),
    "validate": ("validate/validate", "validate.validate"),
    "subflow": ("subflow/subflow", "subflow.subflow"),
}
FORMS = ("csv", "csv.gz", "parquet")
S3_STORE = {"AWS_ENDPOINT_URL": "http://s3:9000", **S3_KEYS}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many runs of which sizes each stage makes."""

    runs: int = 5  # latency runs per design, and per worker query interval
    warm_up: bool = True  # a first, unmeasured run of each design (image pulls, caches)
    rows: tuple[int, ...] = (1_000, 100_000, 1_000_000, 10_000_000)
    size_runs: int = 3
    stores: tuple[str, ...] = ("file", "s3")
    format_rows: tuple[int, ...] = (1_000_000,)
    mapped_rows: tuple[int, ...] = (10_000_000, 50_000_000)
    partitions: tuple[int, ...] = (1, 2, 4)
    concurrency: tuple[int, ...] = (10, 50)
    throughput_baseline: bool = True  # the process design at each concurrency too, not only in latency
    redeploys: int = 3
    intervals: tuple[float, ...] = (0.25, 1.0)
    idle_s: float = 30
    api_calls: int = 200  # per call and way; 10 times as many for throughput
    deadline: float = 3600  # seconds a run may take: the full plan's inputs are large
    # Stages in lanes that run at once, each lane one stage after another; None: all in one lane.
    # Its figures then share the machine: the smoke's only (they are not its business).
    lanes: tuple[tuple[str, ...], ...] | None = None

    @classmethod
    def smoke(cls) -> "Plan":
        """Each stage once, at its smallest size: proves the benchmark works, not its figures."""
        return cls(
            runs=1, warm_up=False, rows=(1_000,), size_runs=1, stores=("file",), format_rows=(1_000,),
            mapped_rows=(), partitions=(2,), concurrency=(1,), throughput_baseline=False, redeploys=1, idle_s=1,
            api_calls=5,
            intervals=(),  # the idle CPU at .env's interval only: the latency stage runs at that interval
            deadline=RUN_DEADLINE,  # a hung run fails the smoke in minutes, naming itself
            # Two lanes, of about equal time. cached and redeploy (it changes subflow's deployment)
            # share one: a cached run must find the image it cached.
            lanes=(
                ("latency", "cached", "redeploy", "diamond", "polling"),
                ("floor", "sizes", "formats", "mapped", "throughput", "cancel", "authority"),
            ),
        )  # fmt: skip


def runs_baseline(stage: str, plan: Plan) -> bool:
    """Whether `stage` runs the process design: the baseline is up only then."""
    return stage == "latency" or (stage == "throughput" and plan.throughput_baseline)


def floor(bench: Bench, plan: Plan) -> dict[str, Any]:
    """Per component image: a container's start, and its start plus the imports of the engine and
    the component; the pipeline's floor is the three serial hops' sum."""

    def timed(*args: str) -> float:
        started = time.monotonic()
        bench.stack.sh(*args)
        return time.monotonic() - started

    result: dict[str, Any] = {}
    for component, (deployment, module) in COMPONENTS.items():
        image = bench.stack.deployment(deployment).job_variables["image"]
        load = f"import sys; sys.path.insert(0, '/opt/prefect/pipeline'); import prefect.engine, {module}"
        bounds = [a for key, value in SETTINGS.items() if key.startswith("MAX_") for a in ("-e", f"{key}={value}")]
        result[component] = {
            "start": spread([timed("docker", "run", "--rm", "--entrypoint", "true", image) for _ in range(plan.runs)]),
            "start+imports": spread(
                [
                    timed("docker", "run", "--rm", *bounds, "--entrypoint", "python", image, "-c", load)
                    for _ in range(plan.runs)
                ]
            ),
        }
    result["pipeline"] = sum(v["start+imports"]["median"] for v in result.values())
    return result


def latency(bench: Bench, plan: Plan) -> dict[str, Any]:
    """Trigger to completed of one pipeline run and its hops, designs alternating run by run, and
    the CPU each run cost, by where it was spent."""
    samples: dict[str, list[dict[str, float]]] = {design: [] for design in bench.designs}
    costs: dict[str, list[dict[str, float]]] = {design: [] for design in bench.designs}
    for deployment in bench.designs.values() if plan.warm_up else ():  # first image pulls, caches
        bench.stack.run(deployment)
    for _ in range(plan.runs):
        for design, deployment in bench.designs.items():
            meter = CpuMeter(bench, design).start()
            run = bench.stack.run(deployment)
            costs[design].append(meter.per_run(1, [bench.stack.output(run)]))
            assert correct(bench, run), (design, run.state)
            samples[design].append(hops(bench, run))
    return {
        design: {
            **{key: spread([s[key] for s in runs]) for key in runs[0]},
            "cpu": {key: spread([c[key] for c in costs[design]]) for key in costs[design][0]},
        }
        for design, runs in samples.items()
    }


def cached(bench: Bench, plan: Plan) -> dict[str, Any]:
    """Trigger to completed of a pipeline run whose every step is reused from the cache."""
    samples: list[dict[str, float]] = []
    filled = False
    while len(samples) < plan.runs:
        run = bench.stack.run(bench.designs["docker"], refresh=[])
        assert correct(bench, run), run.state
        if len(bench.stack.output(run)["cached"]) < 3:  # the stage runs alone: this run filled the cache
            assert not filled and not samples, f"run {run.id} reused {bench.stack.output(run)['cached']}"
            filled = True
            continue
        assert not bench.stack.children(run.id), f"run {run.id} is all cached, yet started steps"
        with bench.stack.api() as client:
            seen = timestamps(client, run.id)
        samples.append(
            {
                "trigger to completed": seen["COMPLETED"] - seen["SCHEDULED"],
                "main: running to completed": seen["COMPLETED"] - seen["RUNNING"],
            }
        )
    return {key: spread([s[key] for s in samples]) for key in samples[0]}


def polling(bench: Bench, plan: Plan) -> dict[str, Any]:
    """The worker query interval's price: the stack's idle CPU at .env's interval, then the docker
    design's latency and the idle CPU at each other interval. The workers go back to .env's after."""
    workers, env = ("worker-flow", "worker-subflow"), SETTINGS["PREFECT_WORKER_QUERY_SECONDS"]
    result = {env: {"idle": idle_cpu(bench, plan.idle_s)}}
    try:
        for interval in map(str, plan.intervals):
            if interval != bench.stack.overrides.get("PREFECT_WORKER_QUERY_SECONDS", env):  # else as they run
                bench.stack.overrides["PREFECT_WORKER_QUERY_SECONDS"] = interval  # the workers recreated with it:
                bench.stack.compose("up", "-d", "--wait", "--no-deps", *workers, timeout=600)
            seconds = [trigger_to_completed(bench, bench.stack.run(bench.designs["docker"])) for _ in range(plan.runs)]
            result[interval] = {"docker": spread(seconds), "idle": idle_cpu(bench, plan.idle_s)}
    finally:
        if bench.stack.overrides.pop("PREFECT_WORKER_QUERY_SECONDS", env) != env:
            bench.stack.compose("up", "-d", "--wait", "--no-deps", *workers, timeout=600)
    return result


def sizes(bench: Bench, plan: Plan) -> dict[str, Any]:
    """The docker design on growing inputs, in each store: time and each flow container's peak memory."""
    result: dict[str, Any] = {}
    for store in plan.stores:
        if store == "s3":
            bench.stack.use_store("s3://pipeline/data", **S3_STORE)
        try:
            for n in plan.rows:
                url = bench.serve(n)
                expected = expected_summary(iris_like(n, seed=n)) if n <= 1_000_000 else None
                samples = []
                for _ in range(plan.size_runs):
                    run = bench.stack.run(bench.designs["docker"], source=url, timeout=plan.deadline)
                    output = bench.stack.output(run) if run.state.is_completed() else None
                    samples.append(
                        {
                            "seconds": hops(bench, run)["trigger to completed"] if output else None,
                            "correct": bool(output)
                            and (expected is None or correct(bench, run, expected))
                            and output["input"]["rows"] == n,
                            "state": run.state.name,
                            "peak_mb": {
                                "main_flow": output["peak_rss_bytes"] / 2**20,
                                **{k.split("/")[0]: r["peak_rss_bytes"] / 2**20 for k, r in output["results"].items()},
                            }
                            if output
                            else {},
                            "csv_mb": (bench.data / f"rows{n}.csv").stat().st_size / 2**20,
                            "parquet_mb": output["input"]["bytes"] / 2**20 if output else None,
                        }
                    )
                result.setdefault(store, {})[str(n)] = samples
        finally:
            if store == "s3":  # back to the file store
                for name in S3_STORE:
                    bench.stack.overrides.pop(name)
                bench.stack.use_store(SETTINGS["PIPELINE_DATA_URL"])
    return result


def formats(bench: Bench, plan: Plan) -> dict[str, Any]:
    """The ingest alone (no steps) of the same rows as CSV, gzip CSV and Parquet, forms alternating
    run by run: what each form costs, and the main flow's peak memory. The steps after it read the
    same stored Parquet whatever the form (sizes times them)."""
    result: dict[str, Any] = {}
    for n in plan.format_rows:
        columns = iris_like(1).column_names
        samples: dict[str, list[dict[str, Any]]] = {form: [] for form in FORMS}
        for _ in range(plan.size_runs):
            for form in FORMS:  # alternating, so drift hits every form alike
                source = bench.serve(n, form)
                run = bench.stack.run(bench.designs["docker"], source=source, steps=[], timeout=plan.deadline)
                output = bench.stack.output(run) if run.state.is_completed() else None
                stored = (output["input"]["rows"], output["input"]["columns"]) if output else None
                samples[form].append(
                    {
                        "seconds": trigger_to_completed(bench, run) if output else None,
                        "correct": stored == (n, columns),
                        "main_peak_mb": output["peak_rss_bytes"] / 2**20 if output else None,
                    }
                )
        result[str(n)] = {
            form: {
                "source_mb": (bench.data / f"rows{n}.{form}").stat().st_size / 2**20,
                "seconds": spread([s["seconds"] for s in got if s["seconds"] is not None] or [float("nan")]),
                "correct": sum(s["correct"] for s in got),
                "runs": len(got),
                "main_peak_mb": max((s["main_peak_mb"] for s in got if s["main_peak_mb"]), default=None),
            }
            for form, got in samples.items()
        }
    return result


def mapped(bench: Bench, plan: Plan) -> dict[str, Any]:
    """validate's wall time mapped over each number of partitions, then subflow, on each size and on
    1,000 rows (what partitions cost), counts alternating run by run; each input ingested once, in
    max(partitions) parts, by the first run, and replayed by the others. Every run's summary must be
    the same, byte for byte (and the expected one up to 1M rows)."""
    result: dict[str, Any] = {}
    for n in dict.fromkeys([*plan.mapped_rows, 1_000]):
        part_rows = -(-n // max(plan.partitions))  # so that the input has max(partitions) parts
        source: dict[str, Any] = {"source": bench.serve(n), "part_rows": part_rows}
        summaries: set[str] = set()
        expected = expected_summary(iris_like(n, seed=n)) if n <= 1_000_000 else None
        samples: dict[int, list[dict[str, float]]] = {p: [] for p in plan.partitions}
        for _ in range(plan.size_runs):
            for p in plan.partitions:
                steps = [{"step": "validate/validate", "partitions": p}, "subflow/subflow"]
                run = bench.stack.run(bench.designs["docker"], steps=steps, timeout=plan.deadline, **source)
                assert run.state.is_completed() and (expected is None or correct(bench, run, expected)), run.state
                output = bench.stack.output(run)
                source = {"data": output["input"]}  # the next runs replay this one's stored input
                step = output["results"]["validate/validate"]
                assert len(step["partitions"]) == p and step["output"]["rows"] == n, step["summary"]
                with bench.stack.api() as client:  # where a partition's time goes: start (container, imports), work
                    seen = [timestamps(client, r["flow_run_id"]) for r in step["partitions"]]
                samples[p].append(
                    {
                        "seconds": step["seconds"],
                        "scheduled to running": max(t["RUNNING"] - t["SCHEDULED"] for t in seen),
                        "running to completed": max(t["COMPLETED"] - t["RUNNING"] for t in seen),
                    }
                )
                summaries.add(output["results"]["subflow/subflow"]["output"]["sha256"])
        assert len(summaries) == 1, f"{n} rows: the summary differs between partition counts"
        result[str(n)] = {str(p): {k: spread([x[k] for x in xs]) for k in xs[0]} for p, xs in samples.items()}
    return result


def diamond(bench: Bench, plan: Plan) -> dict[str, Any]:
    """prefect.yaml's `enriched` pipeline, a diamond (validate and subflow at once on the input,
    then a join of both), against the same steps one after another, alternating run by run:
    trigger to completed, and the diamond's longest path, the sequence less its shorter branch."""
    sequence = [
        "validate/validate",
        "subflow/subflow",
        {"step": "join/join", "needs": {"rows": "validate", "groups": "subflow"}},
    ]
    samples: dict[str, list[float]] = {"diamond": [], "sequence": [], "longest path": []}
    for _ in range(plan.runs):
        for design, steps in (("diamond", {}), ("sequence", {"steps": sequence})):
            run = bench.stack.run("main-flow/enriched", timeout=plan.deadline, **steps)
            output = bench.stack.output(run) if run.state.is_completed() else {}
            assert output and output["results"]["join/join"]["summary"][0]["rows"] == 150, (design, run.state)
            samples[design].append(trigger_to_completed(bench, run))
            if design == "sequence":
                with bench.stack.api() as client:
                    branches = [timestamps(client, output["results"][s]["flow_run_id"]) for s in sequence[:2]]
                shorter = min(t["COMPLETED"] - t["SCHEDULED"] for t in branches)
                samples["longest path"].append(samples["sequence"][-1] - shorter)
    return {figure: spread(xs) for figure, xs in samples.items()}


def throughput(bench: Bench, plan: Plan) -> dict[str, Any]:
    """N pipeline runs created at once, per design: wall time, all correct, 503s in the server's
    log, and the CPU each run cost."""
    result: dict[str, Any] = {}
    designs = {d: deployment for d, deployment in bench.designs.items() if plan.throughput_baseline or d != "process"}
    for n in plan.concurrency:
        for design, deployment in designs.items():
            since, meter = datetime.now(UTC), CpuMeter(bench, design).start()
            started = time.monotonic()
            runs = [bench.stack.start(deployment).id for _ in range(n)]  # at once, through the API
            finished = [bench.stack.wait_final(run_id, timeout=plan.deadline) for run_id in runs]
            wall = time.monotonic() - started
            outputs = [bench.stack.output(run) for run in finished if run.state.is_completed()]
            result.setdefault(str(n), {})[design] = {
                "wall": wall,
                "correct": sum(correct(bench, run) for run in finished),
                "runs": n,
                "503s": server_503s(bench, since),
                "cpu": meter.per_run(n, outputs) if outputs else {},
            }
    return result


def server_503s(bench: Bench, since: datetime) -> int:
    logs = bench.stack.compose("logs", "--no-log-prefix", "--since", since.isoformat(), "prefect-server").stdout
    return sum(
        ("503" in line and "Service Unavailable" in line) or "database is locked" in line for line in logs.splitlines()
    )


def redeploy(bench: Bench, plan: Plan) -> dict[str, float]:
    """`prefect deploy --name subflow` after a one-line change, from a copy of the project; then
    the deployment back on the image it ran before, as `make rollback` does (nothing built)."""
    before, samples = bench.stack.deployment("subflow/subflow"), []
    try:
        for _ in range(plan.redeploys):
            with tempfile.TemporaryDirectory() as tmp:
                project = project_copy(Path(tmp))
                code = project / "subflow" / "subflow.py"
                code.write_text(code.read_text() + f"\n# benchmark change {time.time_ns()}\n")
                samples.append(bench.stack.deploy("subflow", cwd=project)[0])
    finally:
        with bench.stack.api() as client:
            back = DeploymentUpdate(job_variables=before.job_variables, version=before.version)
            client.update_deployment(before.id, back)
    return spread(samples)


def authority(bench: Bench, plan: Plan) -> dict[str, Any]:
    """What per-run authority costs a flow container's API calls: each call through the flow
    listener with a run's own credential (the authority checks it against the run, bodies
    included) against the same call with one shared credential (the admin listener: nginx, then
    the server), alternating; latency one at a time, and throughput 10 at once."""
    stack = bench.stack
    run = stack.start(bench.designs["docker"], steps=[])  # its main container is all it needs
    credential = own_credential(bench, run.id)
    assert stack.wait_final(run.id).state.is_completed()
    with stack.api() as client:  # a task run of its own, for its logs to name
        body = {"flow_run_id": str(run.id), "task_key": "bench", "dynamic_key": "bench", "name": "bench"}
        task_run = client.request("POST", "/task_runs/", json=body).json()
    flow_listener = f"http://127.0.0.1:{stack.env()['PREFECT_FLOW_PORT']}/api"
    ways = {
        "per-run authority": (flow_listener, credential),
        "shared credential": (stack.api_url, stack.secret("api-auth-string")),
    }
    log = [{"flow_run_id": str(run.id), "task_run_id": task_run["id"], "level": 20, "message": "bench",
            "name": "bench", "timestamp": datetime.now(UTC).isoformat()}]  # fmt: skip
    calls = {
        "read its run": ("GET", f"/flow_runs/{run.id}", None),
        "write a log": ("POST", "/logs/", log),
    }
    result: dict[str, Any] = {}
    with contextlib.ExitStack() as opened:  # Prefect's own clients: they fetch the CSRF token for writes
        clients = {way: opened.enter_context(SyncPrefectClient(url, auth_string=a)) for way, (url, a) in ways.items()}
        for call, (method, path, body) in calls.items():
            samples: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(plan.api_calls):
                for way, client in clients.items():  # alternating: the same load on both
                    samples[way].append(timed(client, method, path, body))
            result[call] = {way: spread([s * 1000 for s in xs]) for way, xs in samples.items()}
        result["10 at once, calls/s"] = {
            way: at_once(client, *calls["read its run"], plan.api_calls * 10) for way, client in clients.items()
        }
    return result


def timed(client: SyncPrefectClient, method: str, path: str, body: Any) -> float:
    """Seconds of one API call, which must succeed."""
    started = time.monotonic()
    client.request(method, path, json=body)  # type: ignore[arg-type]  # a concrete path, not a route
    return time.monotonic() - started


def at_once(client: SyncPrefectClient, method: str, path: str, body: Any, n: int) -> float:
    """Calls per second of `n` calls, 10 at a time."""
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda _: timed(client, method, path, body), range(n)))
    return n / (time.monotonic() - started)


def own_credential(bench: Bench, run_id: Any) -> str:
    """The credential the worker gave the container of `run_id`, read off the container."""
    (container,) = wait_for("the run's container", lambda: bench.stack.containers(run_id, running=True), 120, 0.1)
    env = json.loads(bench.stack.sh("docker", "inspect", "-f", "{{json .Config.Env}}", container).stdout)
    return next(item.split("=", 1)[1] for item in env if item.startswith("PREFECT_API_AUTH_STRING="))


def cancel(bench: Bench, plan: Plan) -> dict[str, Any]:
    """How soon a pipeline stops: from its cancel to the last of its containers gone,
    and from its main container killed to its last step run final and its containers gone; each
    while validate runs in partitions, two at a time."""
    samples: dict[str, list[float]] = {CANCELLED: [], KILLED: []}
    for i in range(plan.runs):
        for n, figure in enumerate(samples):
            samples[figure].append(stop_one(bench, figure, bench.serve(1_000 + 2 * i + n), plan.deadline))  # uncached
    return {figure: {**spread(xs), "samples": xs} for figure, xs in samples.items()}


CANCELLED, KILLED = "cancel to every container gone", "main killed to every step stopped"


def stop_one(bench: Bench, figure: str, source: str, deadline: float) -> float:
    """Seconds from a cancel (or a kill) of one pipeline run to it stopped."""
    stack, steps = bench.stack, [{"step": "validate/validate", "rows_per_partition": 50}]
    run = stack.start(bench.designs["docker"], source=source, steps=steps, part_rows=50, partitions_at_once=2)
    wait_for("a validate partition running", lambda: stack.running_steps(run.id), deadline)
    (container,) = wait_for("the main container", lambda: stack.containers(run.id, running=True), 120)
    with stack.api() as client:
        started = time.monotonic()
        if figure == CANCELLED:  # what `prefect flow-run cancel` asks, less the CLI's start (seconds here)
            client.set_flow_run_state(run.id, State(type=StateType.CANCELLING))
        else:
            stack.sh("docker", "kill", container)
    stack.wait_stopped(run.id, 300, every=0.2)
    return time.monotonic() - started


STAGES: dict[str, Callable[[Bench, Plan], Any]] = {
    "floor": floor,
    "latency": latency,
    "cached": cached,
    "polling": polling,
    "sizes": sizes,
    "formats": formats,
    "mapped": mapped,
    "diamond": diamond,
    "throughput": throughput,
    "redeploy": redeploy,
    "authority": authority,
    "cancel": cancel,
}
