"""Failure, concurrency and restarts on real Docker: nothing lost, mixed up, half-written or hanging."""

import gzip
import re
from collections.abc import Callable
from typing import Any

import pytest
from harness import PREFECT, iris_like, wait_for, write_csv
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.exceptions import PrefectHTTPStatusError

from conftest import iris_rows, to_csv

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bad_numeric(serve) -> str:
    rows = iris_rows()
    rows[3]["petal_width"] = "abc"
    return serve("bad_numeric.csv", to_csv(rows))


def assert_failed_cleanly(stack, run, message: str, children: int = 0) -> None:
    """Failed with `message`, `children` step runs at most, and no pipeline output."""
    assert run.state.is_failed(), run.state
    assert message in run.state.message, run.state.message
    assert len(stack.children(run.id)) == children
    assert not stack.exists(stack.layout(run.id).output)


def test_a_failing_step_fails_the_pipeline_and_stops_it(stack, bad_numeric):
    run = stack.run("main-flow/main", source=bad_numeric)
    message = "column 'petal_width' failed coerce_dtype('float64') with 'abc' at row 3"
    assert_failed_cleanly(stack, run, "step validate/validate", children=1)  # subflow never ran
    assert "ended Failed" in run.state.message and message in run.state.message
    assert stack.child(run.id, "validate").state.is_failed()


def test_a_missing_deployment_fails_at_once_with_a_hint(stack):
    run = stack.run("main-flow/main", steps=["validate/validate", "enrich/enrich"])
    message = "deployment 'enrich/enrich' not found: register it with `prefect deploy --name enrich`"
    assert_failed_cleanly(stack, run, message, children=1)


def test_a_killed_main_container_is_reported_and_removed(stack):
    """A step's container killed is the memory-limit case below: the same path, Crashed."""
    run = stack.start("main-flow/main")
    container = wait_for("the main flow's container", lambda: stack.containers(run.id, running=True), 120)
    stack.sh("docker", "kill", *container)
    assert stack.wait_final(run.id).state.is_crashed()
    wait_for(f"containers of {run.id} to be removed", lambda: not stack.containers(run.id))


def test_a_step_over_its_memory_limit_crashes_is_retried_and_says_so(stack):
    """Crashed is retried (`retries: 1` here, 2 by default), Failed never (the first test above)."""
    subflow = stack.deployment("subflow/subflow")
    with stack.api() as client:  # a per-deployment override of the pool's limit
        client.update_deployment(
            subflow.id, DeploymentUpdate(job_variables={**subflow.job_variables, "mem_limit": "40m"})
        )
    try:
        run = stack.run("main-flow/main", steps=["validate/validate", {"step": "subflow/subflow", "retries": 1}])
    finally:
        with stack.api() as client:
            client.update_deployment(subflow.id, DeploymentUpdate(job_variables=subflow.job_variables))
    attempts = step_runs(stack, run.id)["subflow"]
    oom = "status code 137. Process was killed, likely due to an out-of-memory (OOM) condition"
    assert [(a.state.is_crashed(), oom in a.state.message, a.tags) for a in attempts] == [
        (True, True, []),
        (True, True, ["attempt-2"]),
    ], [a.state for a in attempts]
    assert_failed_cleanly(stack, run, "step subflow/subflow", children=3)
    assert "ended Crashed" in run.state.message and oom in run.state.message
    assert "(attempt 2 of 2)" in run.state.message


def step_runs(stack, run_id) -> dict[str, list]:
    """A main run's step runs by flow name, oldest first."""
    runs: dict[str, list] = {}
    for child in sorted(stack.children(run_id), key=lambda child: child.created):
        runs.setdefault(stack.flow_name(child), []).append(child)
    return runs


def assert_completed_once(stack, run, rows: list[dict[str, str]]) -> None:
    """Completed and correct by content; each step completed exactly once (attempts that crashed
    aside) and none of its runs left unfinished."""
    assert run.state.is_completed(), run.state
    output = stack.output(run)
    subflow = output["results"]["subflow/subflow"]
    assert subflow["rows"] == output["input"]["rows"] == len(rows)
    for group in subflow["summary"]:
        members = [r for r in rows if r["species"] == group["species"]]
        mean = sum(float(r["sepal_length"]) for r in members) / len(members)
        assert group["count"] == len(members) and abs(group["mean_sepal_length"] - mean) < 1e-3
    with stack.api() as client:
        assert client.read_variable_by_name(subflow["variable"]).value["summary"] == subflow["summary"]
    attempts = step_runs(stack, run.id)
    assert sorted(attempts) == ["subflow", "validate"], attempts
    for flow, runs in attempts.items():
        assert [r.state.type.value for r in runs] == ["CRASHED"] * (len(runs) - 1) + ["COMPLETED"], (flow, runs)
    assert subflow["flow_run_id"] == str(attempts["subflow"][-1].id)


def restart_server(stack) -> None:
    stack.compose("restart", "prefect-server")
    wait_for("the server to answer again, from its database", stack.ready, 120)


def test_ten_pipelines_at_once_through_two_server_restarts(stack, serve):
    """The soak: ten pipelines in flight while the server restarts twice; none mixes, loses or
    repeats a step."""
    rows = iris_rows()
    sources = {i: serve(f"part{i}.csv", to_csv(rows[i::10])) for i in range(10)}
    runs = {i: stack.start("main-flow/main", source=url) for i, url in sources.items()}  # at once
    ids = [run.id for run in runs.values()]
    for _ in range(2):
        wait_for("a step running", lambda: steps_running(stack, ids), 300)
        restart_server(stack)
    finished = {i: stack.wait_final(run.id, timeout=900) for i, run in runs.items()}
    for i, run in finished.items():
        assert stack.output(run)["source"] == sources[i]
        assert_completed_once(stack, run, rows[i::10])


def steps_running(stack, ids: list) -> list:
    return [child for child in stack.children(*ids) if child.state.is_running()]


# One case per path through real containers; main_flow/test_main_flow.py has every refusal.
@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("http://gateway:4200/docs", "host 'gateway' has the non-public address"),
        (
            "http://testdata:8000/missing.csv",
            "cannot fetch source 'http://testdata:8000/missing.csv': HTTP 404",
        ),
    ],
)
def test_bad_sources_fail_early_with_a_clear_message(stack, source, message):
    assert_failed_cleanly(stack, stack.run("main-flow/main", source=source), message)


def test_a_source_over_max_bytes_once_decompressed_fails_early_and_leaves_nothing(stack, serve, tmp_path):
    """1M rows of gzip CSV, under max_bytes as sent, over it inflated: refused while it streams,
    before any step, and the parts already written go. The unit tests have every malformed file."""
    plain = write_csv(iris_like(1_000_000, seed=3), tmp_path / "rows1m.csv").read_bytes()
    packed = gzip.compress(plain, compresslevel=1)
    limit = (len(packed) + len(plain)) // 2
    run = stack.run("main-flow/main", source=serve("rows1m.csv.gz", packed), max_bytes=limit, part_rows=100_000)
    assert_failed_cleanly(stack, run, f"rows1m.csv.gz' is larger than max_bytes={limit} once decompressed")
    assert not stack.exists(stack.layout(run.id).input)


def test_a_corrupt_stored_input_fails_before_any_step(stack):
    done = stack.run("main-flow/main")
    data = stack.output(done)["input"]
    corrupt = stack.run("main-flow/main", data={**data, "sha256": "0" * 64})
    assert_failed_cleanly(stack, corrupt, f"stored object corrupt: {data['uri']} does not match its sha256")


@pytest.mark.parametrize(
    "parameters",
    [
        {"step_timeout_s": "abc"},
        {"step_timeout_s": 0},
        {"fetch_timeout_s": 0.5},
        {"max_bytes": 0},
        {"steps": ["not a deployment"]},
    ],
)
def test_wrong_parameters_are_rejected_before_any_run(stack, parameters):
    with stack.api() as client:
        before = len(client.read_flow_runs())
        main = stack.deployment("main-flow/main")
        with pytest.raises(PrefectHTTPStatusError, match=list(parameters)[0]):
            client.create_flow_run_from_deployment(main.id, parameters=parameters)
        assert len(client.read_flow_runs()) == before


def test_the_cli_names_a_rejected_parameter(stack):
    cli = stack.sh(PREFECT, "deployment", "run", "main-flow/main", "--param", "step_timeout_s=0", check=False)
    assert cli.returncode != 0 and "step_timeout_s" in cli.stdout + cli.stderr


def history(stack) -> dict[str, int]:
    """How many deployments, variables, artifacts and flow runs the server holds."""
    with stack.api() as client:
        return {
            "deployments": len(client.read_deployments()),
            "variables": len(client.read_variables()),
            "artifacts": len(client.read_artifacts()),
            "flow_runs": len(client.read_flow_runs()),
        }


def workers_online(stack) -> bool:
    with stack.api() as client:
        return all(
            any(w.status.value == "ONLINE" for w in client.read_workers_for_work_pool(stack.env()[pool]))
            for pool in ("FLOW_POOL", "SUBFLOW_POOL")
        )


def test_a_stack_down_and_up_keeps_its_state(stack):
    """Postgres keeps everything on its volume; `up --wait` returns once the workers poll again."""
    assert stack.run("main-flow/main").state.is_completed()
    before = history(stack)
    assert all(before.values()), before
    stack.compose("down")
    stack.compose("up", "-d", "--wait")
    assert workers_online(stack)
    assert history(stack) == before
    assert stack.run("main-flow/main").state.is_completed()


def down_as_a_step_starts(service: str) -> Callable:
    """The step's container, frozen as it starts, runs its engine while `service` is away."""

    def fault(stack):
        run = stack.start("main-flow/main")
        child = stack.child(run.id, "subflow")
        container = wait_for("the step's container", lambda: stack.containers(child.id, running=True), 120, every=0.1)
        stack.sh("docker", "pause", *container)
        stack.compose("stop", service)
        try:
            stack.sh("docker", "unpause", *container)
            refused = re.compile(rf"/api/flow_runs/{child.id}\S* HTTP/1.1\" 50[0-4] ")  # the gateway's log
            wait_for("the step's API call refused", lambda: refused.search(stack.compose("logs", "gateway").stdout))
        finally:
            stack.compose("start", service)
        return run

    return fault


def worker_away_as_a_step_waits(stack):
    """Steps wait in their pool's queue: a run past its `step_timeout_s` cancels its step and
    fails; the other one completes once the worker is back."""
    stack.compose("stop", "worker-subflow")
    try:
        run = stack.start("main-flow/main")
        late = stack.run("main-flow/main", step_timeout_s=10)
        assert stack.child(run.id, "validate").state.is_scheduled()
    finally:
        stack.compose("start", "worker-subflow")
    assert_failed_cleanly(stack, late, "did not finish within 10.0s", children=1)
    assert f"Check that a worker is polling work pool '{stack.env()['SUBFLOW_POOL']}'" in late.state.message
    assert stack.child(late.id, "validate").state.is_cancelled()
    return run


def registry_away_as_a_step_pulls(stack):
    """The step's image must be pulled: its run crashes and is started again until the registry is back."""
    stack.forget_image("subflow/subflow")
    stack.compose("stop", "registry")
    try:
        run = stack.start("main-flow/main", steps=["validate/validate", {"step": "subflow/subflow", "retries": 8}])
        first = wait_for("a crashed subflow", lambda: crashed(stack, run.id), 300)
    finally:
        stack.compose("start", "registry")
    assert str(stack.registry_port) in first.state.message, first.state  # its pull from the registry failed
    return run


def crashed(stack, run_id) -> Any:
    """The first step run of a main run that Crashed, if any."""
    return next((c for runs in step_runs(stack, run_id).values() for c in runs if c.state.is_crashed()), None)


@pytest.mark.parametrize(
    "fault",
    [
        down_as_a_step_starts("prefect-server"),
        down_as_a_step_starts("postgres"),
        worker_away_as_a_step_waits,
        registry_away_as_a_step_pulls,
    ],
    ids=["server down", "database down", "worker away", "registry away"],
)
def test_a_pipeline_in_flight_completes_through(stack, fault):
    run = fault(stack)
    wait_for("the server to answer again, from its database", stack.ready, 120)
    assert_completed_once(stack, stack.wait_final(run.id), iris_rows())
