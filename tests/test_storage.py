"""The data store, set by configuration alone: the same pipeline on the stack's volume and on an
S3 endpoint (moto's server, tests/compose.yml), 100,000 rows over HTTP in both, and retention."""

import json
import time

import pytest
from harness import S3_KEYS, SETTINGS, expected_summary, iris_like, readme_blocks, wait_for, write_csv
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

pytestmark = pytest.mark.e2e

ROWS = 100_000
S3_STORE = {"AWS_ENDPOINT_URL": "http://s3:9000", **S3_KEYS}


@pytest.fixture(scope="module")
def dataset(stack, serve, tmp_path_factory):
    """100,000 random rows with the Iris columns, served over HTTP, and their expected summary."""
    table = iris_like(ROWS, seed=1)
    path = write_csv(table, tmp_path_factory.mktemp("csv") / "rows100k.csv")
    return serve("rows100k.csv", path.read_bytes()), expected_summary(table)


def assert_summary(actual: list[dict], expected: list[dict]) -> None:
    assert [g["species"] for g in actual] == [g["species"] for g in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got["count"] == want["count"]
        assert all(abs(got[k] - want[k]) <= 1e-3 for k in want if k.startswith("mean_")), (got, want)


@pytest.fixture(scope="module")
def file_mode(stack, dataset):
    """The pipeline on 100,000 rows in the default file store: its main run and output."""
    url, _ = dataset
    run = stack.run("main-flow/main", source=url)
    assert run.state.is_completed(), run.state
    return run, stack.output(run)


def test_100k_rows_by_reference_in_file_mode(stack, dataset, file_mode):
    _, expected = dataset
    run, output = file_mode
    assert output["input"]["uri"] == f"{SETTINGS['PIPELINE_DATA_URL']}/runs/{run.id}/input.parquet"
    assert output["input"]["rows"] == ROWS
    subflow = output["results"]["subflow/subflow"]
    assert subflow["rows"] == ROWS and sum(g["count"] for g in subflow["summary"]) == ROWS
    assert_summary(subflow["summary"], expected)
    with stack.api() as client:  # what crossed the API: a reference, a few hundred bytes
        assert len(json.dumps(client.read_flow_run(subflow["flow_run_id"]).parameters)) < 1000


@pytest.fixture(scope="module")
def s3_mode(stack, file_mode):
    """The stack switched to the S3 store by configuration, and back to file afterwards."""
    stack.use_store("s3://pipeline/data", **S3_STORE)
    yield
    for name in S3_STORE:
        stack.overrides.pop(name)
    stack.use_store(SETTINGS["PIPELINE_DATA_URL"])


def test_s3_mode_gives_the_same_output_as_file_mode(stack, dataset, file_mode, s3_mode):
    _, file_output = file_mode
    run = stack.run("main-flow/main", source=dataset[0])
    assert run.state.is_completed(), run.state
    output = stack.output(run)
    prefix = f"s3://pipeline/data/runs/{run.id}"
    assert output["input"]["uri"] == f"{prefix}/input.parquet"
    assert output["results"]["subflow/subflow"]["output"]["uri"] == f"{prefix}/subflow/summary.parquet"
    for key in ("rows", "columns", "sha256", "bytes"):  # the same Parquet, byte for byte
        assert output["input"][key] == file_output["input"][key]
    for name, result in output["results"].items():
        assert result["summary"] == file_output["results"][name]["summary"]
    objects = stack.s3().find(f"pipeline/data/runs/{run.id}")
    assert sorted(o.rsplit(f"{run.id}/", 1)[1] for o in objects) == [
        "input.parquet", "output.json", "subflow/summary.parquet"
    ]  # fmt: skip
    assert stack.s3().find("pipeline/data/results")  # Prefect's results went to the same store
    assert not stack.exists(f"{SETTINGS['PIPELINE_DATA_URL']}/runs/{run.id}")


def test_an_unreachable_s3_endpoint_fails_after_bounded_retries(stack, s3_mode):
    stack.use_store("s3://pipeline/data", **{**S3_STORE, "AWS_ENDPOINT_URL": "http://s3:9"})
    try:
        started = time.monotonic()
        run = stack.run("main-flow/main")
        seconds = time.monotonic() - started
    finally:
        stack.use_store("s3://pipeline/data", **S3_STORE)
    assert run.state.is_failed(), run.state
    assert "cannot reach the data store to write s3://pipeline/data/runs/" in run.state.message
    assert 'Could not connect to the endpoint URL: "http://s3:9/' in run.state.message
    assert stack.children(run.id) == [] and seconds < 300
    with stack.api() as client:  # Prefect's task retries, visible in the UI, before giving up
        (ingest,) = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert ingest.name.startswith("ingest") and ingest.run_count == 3


def test_retention_removes_old_run_data_results_and_variables(stack):
    old = stack.run("main-flow/main")
    # Seconds between the old run's last write and the new run's creation: the cutoff goes there.
    wait_for("two seconds after the old run", lambda: time.time() > old.end_time.timestamp() + 2, 10)
    new = stack.run("main-flow/main")
    variables = {r.id: stack.output(r)["results"]["subflow/subflow"]["variable"] for r in (old, new)}
    cutoff = old.end_time + (new.created - old.end_time) / 2
    results = stack.written(f"{stack.data_url()}/results")
    expired = {path for path, written in results.items() if written < cutoff.timestamp()}
    assert expired and len(expired) < len(results)  # the old run's results, and the new run's
    removal = stack.start("retention/retention", days=(time.time() - cutoff.timestamp()) / 86400)
    removal = stack.wait_final(removal.id)
    assert removal.state.is_completed(), removal.state
    # The expired results are gone, the new run's stay, and retention stored no result of its own.
    assert set(stack.written(f"{stack.data_url()}/results")) == set(results) - expired
    assert not stack.exists(stack.layout(old.id).input)
    assert stack.exists(stack.layout(new.id).output)
    with stack.api() as client:
        assert client.read_variable_by_name(variables[old.id]) is None
        assert client.read_variable_by_name(variables[new.id]) is not None
    # The README's command, as written: nothing is 7 days old here, so the new run stays.
    (command,) = [b[0] for b in readme_blocks("## Data by reference") if b[0].startswith("make retention")]
    assert "Completed" in stack.shell(command)
    assert stack.exists(stack.layout(new.id).output)
