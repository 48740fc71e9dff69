"""The data store, set by configuration alone: the same pipeline on the stack's volume and on an
S3 endpoint (moto's server, tests/compose.yml), 100,000 rows over HTTP in both, and retention."""

import gzip
import json
import uuid

import pytest
from harness import (
    S3_KEYS,
    SETTINGS,
    SOURCES_BUCKET,
    expected_summary,
    iris_like,
    readme_blocks,
    run_a_file_of_yours,
    write_csv,
)
from prefect.client.schemas.actions import VariableCreate

pytestmark = pytest.mark.e2e

ROWS = 100_000
S3_STORE = {"AWS_ENDPOINT_URL": "http://s3:9000", **S3_KEYS}


@pytest.fixture(scope="module")
def dataset(stack, serve, tmp_path_factory):
    """100,000 random rows with the Iris columns, served over HTTP, and their expected summary."""
    table = iris_like(ROWS, seed=1)
    path = write_csv(table, tmp_path_factory.mktemp("csv") / "rows100k.csv")
    return serve("rows100k.csv", path.read_bytes()), expected_summary(table), path


def assert_summary(actual: list[dict], expected: list[dict]) -> None:
    assert [g["species"] for g in actual] == [g["species"] for g in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got["count"] == want["count"]
        assert all(abs(got[k] - want[k]) <= 1e-3 for k in want if k.startswith("mean_")), (got, want)


@pytest.fixture(scope="module")
def file_mode(stack, dataset):
    """The pipeline on 100,000 rows in the default file store: its main run and output."""
    url, _, _ = dataset
    run = stack.run("main-flow/main", source=url)
    assert run.state.is_completed(), run.state
    return run, stack.output(run)


def test_100k_rows_by_reference_in_file_mode(stack, dataset, file_mode):
    _, expected, _ = dataset
    run, output = file_mode
    assert output["input"]["uri"] == f"{SETTINGS['PIPELINE_DATA_URL']}/runs/{run.id}/input/part-00000.parquet"
    assert output["input"]["rows"] == ROWS
    subflow = output["results"]["subflow/subflow"]
    assert subflow["rows"] == ROWS and sum(g["count"] for g in subflow["summary"]) == ROWS
    assert_summary(subflow["summary"], expected)
    with stack.api() as client:  # what crossed the API: a reference, a few hundred bytes
        assert len(json.dumps(client.read_flow_run(subflow["flow_run_id"]).parameters)) < 1000


def test_retention_removes_expired_run_data_results_and_variables(stack):
    """What is older than DAYS, or belongs to a run the server forgot, goes; the rest stays."""
    new = stack.run("main-flow/main")
    variable = stack.output(new)["results"]["subflow/subflow"]["variable"]
    old = stack.layout(uuid.uuid4())  # a run the server no longer knows, with 8-day-old files
    old_dir, results = old.dir.removeprefix("file://"), f"{stack.data_url()}/results".removeprefix("file://")
    cache = f"{stack.data_url()}/cache"
    aged = (
        f"mkdir -p {old_dir}/subflow && touch -d '8 days ago' {old_dir}/input.parquet {results}/expired && "
        f"""echo '{{"run": "{old.run_id}"}}' > {cache.removeprefix("file://")}/expired.json"""
    )
    stack.on_volume("data", "sh", "-c", aged, write_as=SETTINGS["FLOW_UID"])
    with stack.api() as client:
        client.create_variable(
            VariableCreate(
                name=f"subflow-output-{old.run_id}", value={"output": old.step("subflow")}, tags=["subflow-output"]
            )
        )
    kept = set(stack.written(f"{stack.data_url()}/results")) - {f"{results}/expired"}
    with pytest.raises(Exception, match="0 is less than the minimum of 1"):  # days=0 would delete everything
        stack.start("retention/retention", days=0)

    (command,) = [b[0] for b in readme_blocks("## Data by reference") if b[0].startswith("make retention")]
    assert "Completed" in stack.shell(command)  # DAYS=7, as written
    assert not stack.exists(old.dir) and stack.exists(stack.layout(new.id).output)
    assert set(stack.written(f"{stack.data_url()}/results")) == kept
    # The cache entries of the removed run go with it; those of the run kept stay.
    assert not stack.exists(f"{cache}/expired.json")
    kept_entries = stack.on_data_volume("grep", "-rlF", f'"run": "{new.id}"', cache.removeprefix("file://"))
    assert len(kept_entries.stdout.split()) == 3  # ingest, validate, subflow
    with stack.api() as client:
        assert client.read_variable_by_name(f"subflow-output-{old.run_id}") is None
        assert client.read_variable_by_name(variable) is not None


@pytest.fixture(scope="module")
def s3_mode(stack, file_mode):
    """The stack switched to the S3 store by configuration, and back to file afterwards."""
    stack.use_store("s3://pipeline/data", **S3_STORE)
    yield
    for name in S3_STORE:
        stack.overrides.pop(name)
    stack.use_store(SETTINGS["PIPELINE_DATA_URL"])


def test_s3_mode_gives_the_same_output_as_file_mode(stack, dataset, file_mode, s3_mode):
    """The source, too, in S3 and gzip-compressed, in a bucket other than the store's (SOURCE_ALLOW)."""
    _, file_output = file_mode
    source = f"{SOURCES_BUCKET}/raw/rows100k.csv.gz"
    stack.s3().mkdirs(SOURCES_BUCKET, exist_ok=True)
    stack.s3().pipe(source, gzip.compress(dataset[2].read_bytes()))
    run = stack.run("main-flow/main", source=f"s3://{source}")
    assert run.state.is_completed(), run.state
    output = stack.output(run)
    prefix = f"s3://pipeline/data/runs/{run.id}"
    assert output["input"]["uri"] == f"{prefix}/input/part-00000.parquet"
    assert output["results"]["subflow/subflow"]["output"]["uri"] == f"{prefix}/subflow/summary.parquet"
    for key in ("rows", "columns", "sha256", "bytes"):  # the same Parquet, byte for byte
        assert output["input"][key] == file_output["input"][key]
    for name, result in output["results"].items():
        assert result["summary"] == file_output["results"][name]["summary"]
    objects = stack.s3().find(f"pipeline/data/runs/{run.id}")
    assert sorted(o.rsplit(f"{run.id}/", 1)[1] for o in objects) == [
        "input/part-00000.parquet", "output.json", "subflow/summary.parquet"
    ]  # fmt: skip
    assert stack.s3().find("pipeline/data/results")  # Prefect's results went to the same store
    assert not stack.exists(f"{SETTINGS['PIPELINE_DATA_URL']}/runs/{run.id}")


def test_a_file_of_yours_goes_through_the_s3_inbox(stack, s3_mode, tmp_path):
    """README's first run, as written, on the S3 store: the upload goes to the store's inbox in S3."""
    _, output, table = run_a_file_of_yours(stack, tmp_path, seed=6)
    assert output["source"].startswith("s3://pipeline/data/inbox/")
    assert output["results"]["subflow/subflow"]["summary"] == expected_summary(table)
