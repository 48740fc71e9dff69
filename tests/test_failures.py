"""Failure, concurrency and restarts on real Docker: nothing lost, mixed up, half-written or hanging."""

import pytest
from harness import PREFECT, wait_for
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


def test_a_stopped_worker_times_out_and_the_child_is_cancelled(stack):
    stack.compose("stop", "worker-subflow")
    try:
        run = stack.run("main-flow/main", step_timeout_s=10)
    finally:
        stack.compose("up", "-d", "--wait", "worker-subflow")
    pool = stack.env()["SUBFLOW_POOL"]
    assert_failed_cleanly(stack, run, "did not finish within 10.0s", children=1)
    assert f"Check that a worker is polling work pool '{pool}'" in run.state.message
    assert stack.child(run.id, "validate").state.is_cancelled()


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


def test_a_step_over_its_memory_limit_crashes_and_says_so(stack):
    subflow = stack.deployment("subflow/subflow")
    with stack.api() as client:  # a per-deployment override of the pool's limit
        client.update_deployment(
            subflow.id, DeploymentUpdate(job_variables={**subflow.job_variables, "mem_limit": "40m"})
        )
    try:
        run = stack.run("main-flow/main")
    finally:
        with stack.api() as client:
            client.update_deployment(subflow.id, DeploymentUpdate(job_variables=subflow.job_variables))
    child = stack.child(run.id, "subflow")
    oom = "status code 137. Process was killed, likely due to an out-of-memory (OOM) condition"
    assert child.state.is_crashed() and oom in child.state.message, child.state
    assert_failed_cleanly(stack, run, "step subflow/subflow", children=2)
    assert "ended Crashed" in run.state.message and oom in run.state.message


def test_ten_concurrent_runs_never_mix_their_outputs(stack, serve):
    rows = iris_rows()
    sources = {i: serve(f"part{i}.csv", to_csv(rows[i::10])) for i in range(10)}
    runs = {i: stack.start("main-flow/main", source=url) for i, url in sources.items()}  # at once
    finished = {i: stack.wait_final(run.id, timeout=900) for i, run in runs.items()}
    assert all(run.state.is_completed() for run in finished.values()), {i: r.state for i, r in finished.items()}
    children = set()
    with stack.api() as client:
        for i, run in finished.items():
            output, part = stack.output(run), rows[i::10]
            subflow = output["results"]["subflow/subflow"]
            assert output["source"] == sources[i] and subflow["rows"] == output["input"]["rows"] == len(part)
            children.add(subflow["flow_run_id"])
            for group in subflow["summary"]:
                members = [r for r in part if r["species"] == group["species"]]
                mean = sum(float(r["sepal_length"]) for r in members) / len(members)
                assert group["count"] == len(members) and abs(group["mean_sepal_length"] - mean) < 1e-3
            assert client.read_variable_by_name(subflow["variable"]).value["summary"] == subflow["summary"]
    assert len(children) == 10


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


def test_bad_data_fails_early_and_leaves_nothing(stack, serve):
    """One malformed file through real containers; the unit tests have every kind."""
    run = stack.run("main-flow/main", source=serve("ragged.csv", "a,b\n1,2\n3\n"))
    assert_failed_cleanly(stack, run, "a row has a different number of fields than the header")
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


def test_restarts_keep_state_and_workers_reconnect(stack):
    assert stack.run("main-flow/main").state.is_completed()
    before = history(stack)
    assert all(before.values()), before

    stack.compose("restart", "prefect-server")
    stack.compose("up", "-d", "--wait")
    assert history(stack) == before
    wait_for("both workers online after the restart", lambda: workers_online(stack), timeout=120)
    assert stack.run("main-flow/main").state.is_completed()

    before = history(stack)
    stack.compose("down")  # Postgres keeps everything on its volume
    stack.compose("up", "-d", "--wait")
    assert workers_online(stack)  # `up --wait` returns once the workers' healthchecks say so
    assert history(stack) == before
    assert stack.run("main-flow/main").state.is_completed()


def test_a_run_in_flight_across_a_server_restart_completes(stack):
    """The main flow waits on a step while the server restarts; its client retries, nothing is lost.

    The step's container is paused meanwhile: a container that starts its engine while the
    server is down cannot load its run (Prefect retries a connection only after a client's first
    success) and crashes, which the README says.
    """
    run = stack.start("main-flow/main")
    child = stack.child(run.id, "validate")
    container = wait_for("the validate container", lambda: stack.containers(child.id, running=True), 120)
    stack.sh("docker", "pause", *container)
    try:
        stack.compose("restart", "prefect-server")
        wait_for("the server to answer again", stack.running, 120)
    finally:
        stack.sh("docker", "unpause", *container)
    main = stack.wait_final(run.id)
    assert main.state.is_completed(), main.state
    assert all(c.state.is_completed() for c in stack.children(run.id))
