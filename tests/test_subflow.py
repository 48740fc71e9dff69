"""Unit tests of the subflow component, without Docker."""

import csv

import pytest
from conftest import IRIS, IRIS_SETOSA, load_component
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

subflow = load_component("subflow")


def iris_records() -> list[dict[str, str]]:
    with IRIS.open() as file:
        return list(csv.DictReader(file))


def test_summarise_real_iris_data():
    summary = subflow.summarise.fn(iris_records(), "species")
    assert [group["species"] for group in summary] == ["setosa", "versicolor", "virginica"]
    assert summary[0] == IRIS_SETOSA
    assert summary[2]["mean_petal_length"] == 5.552
    assert sum(group["count"] for group in summary) == 150


@pytest.mark.parametrize(
    ("records", "group_by", "message"),
    [
        ([], "species", "empty dataset"),
        ([{"a": "1"}], "species", "group column 'species' not in the data"),
        ([{"species": "x"}], "species", "no measurement columns"),
        ([{"species": "x", "width": "wide"}], "species", "column 'width' must be numeric"),
    ],
)
def test_summarise_rejects_bad_data_with_a_clear_message(records, group_by, message):
    with pytest.raises(ValueError, match=message):
        subflow.summarise.fn(records, group_by)


def test_report_is_a_markdown_table():
    summary = subflow.summarise.fn(iris_records(), "species")
    report = subflow.render_report(summary, "iris.csv", 150, "species")
    assert report.startswith("### 150 rows from `iris.csv` in 3 groups by `species`")
    assert "| setosa" in report and "5.006" in report


def test_flow_returns_summary_and_publishes_it_as_a_variable(prefect_api):
    state = subflow.subflow(iris_records(), source="iris.csv", return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result["rows"] == 150 and result["groups"] == 3
    assert result["summary"][0] == IRIS_SETOSA
    run_id = state.state_details.flow_run_id
    assert result["variable"] == f"subflow-output-{run_id}"
    with get_client(sync_client=True) as client:
        assert client.read_variable_by_name(result["variable"]).value == result["summary"]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["subflow-report"]))
        )
    assert any(a.flow_run_id == run_id and a.data == result["report"] for a in artifacts)
