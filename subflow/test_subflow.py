"""Unit tests of the subflow component on real Parquet in a local store, without Docker."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from conftest import IRIS, IRIS_SETOSA
from stepkit import DataRef, Dataset, dataset_of, write_parquet
from subflow import subflow as component


def store(table: pa.Table, path: Path) -> DataRef:
    """`table` as a Parquet object, and its reference, as the main flow would pass it."""
    return write_parquet(table, f"file://{path}")


def summarise(ref: DataRef, group_by: str) -> pa.Table:
    with Dataset.open(ref) as data:
        return component.summarise(data, group_by)


@pytest.fixture
def iris(tmp_path) -> DataRef:
    return store(pacsv.read_csv(IRIS), tmp_path / "runs" / "r1" / "input.parquet")


def test_summarise_real_iris_data(iris):
    summary = summarise(iris, "species").to_pylist()
    assert [group["species"] for group in summary] == ["setosa", "versicolor", "virginica"]
    assert summary[0] == IRIS_SETOSA
    assert summary[2]["mean_petal_length"] == 5.552
    assert sum(group["count"] for group in summary) == 150


def test_a_dataset_of_parts_summarises_as_the_whole(iris, tmp_path):
    table = pacsv.read_csv(IRIS)
    parts = [
        store(table.slice(start, 40), tmp_path / "runs" / "r1" / f"part-{start}.parquet") for start in (0, 40, 80, 120)
    ]
    assert summarise(dataset_of(parts), "species") == summarise(iris, "species")


@pytest.mark.parametrize(
    ("table", "group_by", "message"),
    [
        ({"a": [1.0]}, "species", "group column 'species' not in the data"),
        ({"species": ["x"]}, "species", "no measurement columns"),
        (
            {"species": ["x", "y"], "width": ["1.5", "wide"]},
            "species",
            "column 'width' must be numeric: row 1 has 'wide'",
        ),
    ],
)
def test_summarise_rejects_bad_data_with_a_clear_message(tmp_path, table, group_by, message):
    ref = store(pa.table(table), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=message):
        summarise(ref, group_by)


def test_numbers_stored_as_text_are_accepted(tmp_path):
    ref = store(pa.table({"g": ["a", "a"], "v": ["1.5", " 2e0 "]}), tmp_path / "x.parquet")
    assert summarise(ref, "g").to_pylist() == [{"g": "a", "count": 2, "mean_v": 1.75}]


def test_flow_stores_the_summary_and_publishes_a_bounded_variable(prefect_api, run_dir):
    groups = 400  # far more than a Variable holds
    table = pa.table({"g": [f"group-{i:04d}" for i in range(groups)] * 2, "v": [1.0] * groups + [3.0] * groups})
    ref = store(table, run_dir / "input.parquet")
    state = component.subflow(data=ref, out=f"file://{run_dir}/subflow", group_by="g", return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["rows"] == 2 * groups and result["groups"] == groups
    assert len(result["summary"]) == component.SHOWN_GROUPS
    assert result["summary"][0] == {"g": "group-0000", "count": 2, "mean_v": 2.0}
    stored = pq.read_table(result["output"]["uri"].removeprefix("file://"))
    assert stored.num_rows == groups and result["output"]["rows"] == groups
    assert "... and 380 more groups in the output" in result["report"]
    with get_client(sync_client=True) as client:
        variable = client.read_variable_by_name(result["variable"]).value
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["subflow-report"]))
        )
    assert variable["output"] == result["output"]["uri"] and variable["truncated"] is True
    assert 0 < len(variable["summary"]) <= component.SHOWN_GROUPS
    assert len(json.dumps(variable)) <= component.VARIABLE_LIMIT
    assert result["variable"] == f"subflow-output-{state.state_details.flow_run_id}"
    assert any(a.data == result["report"] for a in artifacts)


def test_flow_refuses_a_corrupt_input_and_writes_nothing(prefect_api, iris, run_dir):
    state = component.subflow(data={**iris, "sha256": "0" * 64}, out=f"file://{run_dir}/subflow", return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="stored object corrupt: .*input.parquet does not match its sha256"):
        state.result()
    assert not (run_dir / "subflow").exists()  # nothing written from an input that is not what it claims
