"""Failures on real Docker, each distinct path of README's *Failure modes* once: the pipeline
fails cleanly, naming the cause, and leaves nothing half-done. The unit tests have every kind of bad
source, bad data and refused reference; tests/test_faults.py has the platform's own faults."""

import pytest
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.exceptions import PrefectHTTPStatusError

from conftest import iris_rows, to_csv
from tests.harness import PREFECT

pytestmark = pytest.mark.e2e


def assert_failed_cleanly(stack, run, message: str, children: int = 0) -> None:
    """Failed with `message`, `children` step runs at most, and no pipeline output."""
    assert run.state.is_failed(), run.state
    assert message in run.state.message, run.state.message
    assert len(stack.children(run.id)) == children
    assert not stack.exists(stack.layout(run.id).output)


@pytest.fixture(scope="module")
def failed(stack, serve) -> dict:
    """Pipelines that fail on their data, started at once: a bad value for validate, a source on a
    private address."""
    rows = iris_rows()
    rows[3]["petal_width"] = "abc"
    sources = {"bad value": serve("bad_numeric.csv", to_csv(rows)), "private source": "http://gateway:4200/docs"}
    started = {name: stack.start("main-flow/main", source=source) for name, source in sources.items()}
    return {name: stack.wait_final(run.id) for name, run in started.items()}


def test_a_failing_step_fails_the_pipeline_and_stops_it(stack, failed):
    run = failed["bad value"]
    message = "column 'petal_width' failed coerce_dtype('float64') with 'abc' at row 3"
    assert_failed_cleanly(stack, run, "step validate/validate", children=1)  # subflow never ran
    assert "ended Failed" in run.state.message and message in run.state.message
    assert stack.child(run.id, "validate").state.is_failed()


def test_a_source_on_a_private_address_fails_before_any_step(stack, failed):
    assert_failed_cleanly(stack, failed["private source"], "host 'gateway' has the non-public address")


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
    assert [
        (a.state.is_crashed(), oom in a.state.message, [t for t in a.tags if t.startswith("attempt-")])
        for a in attempts
    ] == [
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
