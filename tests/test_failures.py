"""Failure, concurrency and restarts on real Docker: nothing lost, mixed up or hanging."""

import csv
import io
from pathlib import Path

import pytest
from conftest import IRIS
from e2e import (
    PREFECT,
    api,
    child_of,
    children,
    compose,
    containers_of,
    deploy,
    deployment,
    dotenv,
    read_output,
    sh,
    trigger,
    wait_final,
    wait_for,
)
from prefect.exceptions import PrefectHTTPStatusError

pytestmark = pytest.mark.e2e

DATA_HOST = "pipeline-testdata"
DATA_URL = f"http://{DATA_HOST}:8000"


def iris_rows() -> list[dict[str, str]]:
    with IRIS.open() as file:
        return list(csv.DictReader(file))


def to_csv(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


@pytest.fixture(scope="module")
def data_server(stack, tmp_path_factory):
    """An HTTP server on the flows' network serving test datasets at DATA_URL."""
    directory: Path = tmp_path_factory.mktemp("data")
    rows = iris_rows()
    bad = [dict(row) for row in rows]
    bad[3]["petal_width"] = "abc"
    (directory / "bad_numeric.csv").write_text(to_csv(bad))
    (directory / "malformed.csv").write_text("a,b\n1,2\n3\n")
    (directory / "empty.csv").write_text("sepal_length,species\n")
    for i in range(10):  # ten different inputs: every 10th row from offset i
        (directory / f"part{i}.csv").write_text(to_csv(rows[i::10]))
    sh("docker", "rm", "-f", DATA_HOST)
    sh(
        "docker", "run", "-d", "--name", DATA_HOST, "--network", "modular-pipeline",
        "-v", f"{directory}:/data:ro", dotenv()["PREFECT_IMAGE"],
        "python", "-m", "http.server", "8000", "--directory", "/data",
    )  # fmt: skip
    probe = "import urllib.request as u; u.urlopen('http://localhost:8000/empty.csv')"
    wait_for(
        "the test data server",
        lambda: sh("docker", "exec", DATA_HOST, "python", "-c", probe, check=False).returncode == 0,
    )
    yield
    sh("docker", "rm", "-f", DATA_HOST)


def output_exists(run_id) -> bool:
    probe = compose("run", "--rm", "-T", "cli", "test", "-e", f"/output/{run_id}.json", check=False)
    return probe.returncode == 0


def test_subflow_failure_fails_the_pipeline(data_server):
    run = trigger("main-flow/main", f"source={DATA_URL}/bad_numeric.csv")
    assert run.state.is_failed(), run.state
    assert "ended Failed" in run.state.message
    assert "column 'petal_width' must be numeric: row 3 has 'abc'" in run.state.message
    assert child_of(run.id).state.is_failed()
    assert not output_exists(run.id)


def test_stopped_subflow_worker_times_out_and_cancels_the_child(stack):
    compose("stop", "worker-subflow")
    try:
        run = trigger("main-flow/main", "subflow_timeout_s=10")
    finally:
        compose("up", "-d", "--wait", "worker-subflow")
    assert run.state.is_failed(), run.state
    assert "did not finish within 10.0s" in run.state.message
    assert "Check that worker-subflow is running" in run.state.message
    assert child_of(run.id).state.is_cancelled()
    assert not output_exists(run.id)


def test_deleted_subflow_deployment_fails_with_a_hint(stack):
    with api() as client:
        client.delete_deployment(deployment("subflow/subflow").id)
    try:
        run = trigger("main-flow/main")
    finally:
        deploy("subflow")
    assert run.state.is_failed(), run.state
    assert "deployment 'subflow/subflow' not found" in run.state.message
    assert "prefect deploy --name subflow" in run.state.message


@pytest.mark.parametrize("victim", ["subflow", "main"])
def test_killed_container_is_reported_and_removed(stack, victim):
    run = trigger("main-flow/main", watch=False)
    target = child_of(run.id) if victim == "subflow" else run
    container = wait_for(
        f"the {victim} container", lambda: containers_of(target.id, running=True).strip(), 120
    )
    sh("docker", "kill", container)
    main = wait_final(run.id)
    assert wait_final(target.id).state.is_crashed()
    if victim == "subflow":
        assert main.state.is_failed(), main.state
        assert "ended Crashed" in main.state.message
    assert not output_exists(run.id)
    for run_id in {run.id, target.id}:
        wait_for(f"containers of {run_id} to be removed", lambda r=run_id: not containers_of(r))


def test_ten_concurrent_runs_never_mix_their_outputs(data_server):
    main = deployment("main-flow/main")
    with api() as client:  # created at once through the API, as a scheduler or a UI would
        runs = {
            i: client.create_flow_run_from_deployment(
                main.id, parameters={"source": f"{DATA_URL}/part{i}.csv"}
            )
            for i in range(10)
        }
    finished = {i: wait_final(run.id, timeout=600) for i, run in runs.items()}
    assert all(run.state.is_completed() for run in finished.values()), {
        i: run.state for i, run in finished.items()
    }
    rows = iris_rows()
    seen_children = set()
    with api() as client:
        for i, run in finished.items():
            output = read_output(str(run.id))
            part = rows[i::10]
            assert output["source"] == f"{DATA_URL}/part{i}.csv"
            assert output["rows"] == len(part)
            child = child_of(run.id)
            assert output["subflow_run_id"] == str(child.id)
            seen_children.add(child.id)
            for group in output["summary"]:
                members = [r for r in part if r["species"] == group["species"]]
                assert group["count"] == len(members)
                mean = sum(float(r["sepal_length"]) for r in members) / len(members)
                assert abs(group["mean_sepal_length"] - mean) < 1e-3
            assert client.read_variable_by_name(output["variable"]).value == output["summary"]
    assert len(seen_children) == 10


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("data/nope.csv", "source file not found: /opt/prefect/pipeline/main_flow/data/nope.csv"),
        (f"http://{DATA_HOST}:9/iris.csv", f"cannot fetch source 'http://{DATA_HOST}:9/iris.csv'"),
        (f"{DATA_URL}/missing.csv", "cannot fetch source"),
        (f"{DATA_URL}/malformed.csv", "line 3 has a different number of fields"),
        (f"{DATA_URL}/empty.csv", "empty dataset"),
    ],
)
def test_bad_input_fails_early_with_a_clear_message(data_server, source, message):
    run = trigger("main-flow/main", f"source={source}")
    assert run.state.is_failed(), run.state
    assert message in run.state.message
    assert children(run.id) == []  # failed before calling the subflow
    assert not output_exists(run.id)


def test_wrong_parameter_types_are_rejected_before_any_run(stack):
    with api() as client:
        runs_before = len(client.read_flow_runs())
        main = deployment("main-flow/main")
        with pytest.raises(PrefectHTTPStatusError, match="subflow_timeout_s"):
            client.create_flow_run_from_deployment(main.id, parameters={"subflow_timeout_s": "abc"})
        # The reference design's bug, caught by the subflow deployment's schema.
        sub = deployment("subflow/subflow")
        with pytest.raises(PrefectHTTPStatusError, match="records"):
            client.create_flow_run_from_deployment(sub.id, parameters={"data": []})
        assert len(client.read_flow_runs()) == runs_before
    args = ("deployment", "run", "main-flow/main", "--param", "subflow_timeout_s=abc")
    cli = sh(PREFECT, *args, check=False)
    assert cli.returncode != 0 and "subflow_timeout_s" in cli.stdout + cli.stderr


def history() -> dict[str, int]:
    """How many deployments, variables, artifacts and flow runs the server holds."""
    with api() as client:
        return {
            "deployments": len(client.read_deployments()),
            "variables": len(client.read_variables()),
            "artifacts": len(client.read_artifacts()),
            "flow_runs": len(client.read_flow_runs()),
        }


def workers_online() -> bool:
    with api() as client:
        return all(
            any(w.status.value == "ONLINE" for w in client.read_workers_for_work_pool(pool))
            for pool in ("flow-pool", "subflow-pool")
        )


def test_restarts_keep_state_and_workers_reconnect(data_server):
    assert trigger("main-flow/main").state.is_completed()
    before = history()
    assert all(before.values()), before

    compose("restart", "prefect-server")
    compose("up", "-d", "--wait")
    assert history() == before
    wait_for("both workers online after the restart", workers_online, timeout=120)
    assert trigger("main-flow/main").state.is_completed()

    before = history()
    sh("docker", "rm", "-f", DATA_HOST)  # a container of ours on the network would block `down`
    compose("down")
    compose("up", "-d", "--wait")
    # `up --wait` returns only once the workers' own healthchecks say they are polling.
    assert workers_online()
    assert history() == before
    assert trigger("main-flow/main").state.is_completed()


def test_run_in_flight_during_a_server_restart_ends_in_a_final_state(stack, capsys):
    run = trigger("main-flow/main", watch=False)
    child = child_of(run.id)
    wait_for("the subflow container", lambda: containers_of(child.id, running=True).strip(), 120)
    compose("restart", "prefect-server")
    compose("up", "-d", "--wait")
    main = wait_final(run.id, timeout=600)
    with capsys.disabled():
        print(f"\n[measure] run in flight during a server restart: {main.state.name}")
    assert main.state.is_completed() or (main.state.is_failed() and main.state.message), main.state
