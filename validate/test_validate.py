"""Unit tests of the validate component on real Parquet in a local store, without Docker."""

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from conftest import IRIS, ROOT
from stepkit import DataRef, Dataset, write_parquet
from validate import validate as component

# The schema the pipeline declares in prefect.yaml, so the test checks the real declaration.
DEPLOYMENT = next(
    d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == "validate"
)
SCHEMA = DEPLOYMENT["parameters"]["columns"]


def store(table: pa.Table, path: Path) -> DataRef:
    return write_parquet(table, f"file://{path}")


def check(ref: DataRef) -> list[dict]:
    with Dataset.open(ref) as data:
        return component.check(data, component.to_pandera(SCHEMA))


def test_the_declared_schema_admits_the_iris_data(tmp_path):
    ref = store(pacsv.read_csv(IRIS), tmp_path / "iris.parquet")
    assert check(ref) == []


def test_failures_name_the_column_the_check_the_value_and_the_row(tmp_path):
    table = pacsv.read_csv(IRIS).to_pydict()
    table["petal_width"][3] = -1.0
    table["sepal_length"][7] = None
    ref = store(pa.table(table), tmp_path / "bad.parquet")
    failures = check(ref)
    found = {(f["column"], f["check"], f["row"]) for f in failures}
    assert ("petal_width", "greater_than_or_equal_to(0)", 3) in found  # the schema as declared
    assert ("sepal_length", "not_nullable", 7) in found


def test_a_missing_column_is_a_failure(tmp_path):
    ref = store(pa.table({"species": ["x"]}), tmp_path / "x.parquet")
    failures = check(ref)
    assert {f["failure_case"] for f in failures} >= {"sepal_length", "petal_width"}


def test_flow_fails_with_a_report(prefect_api, run_dir):
    table = pacsv.read_csv(IRIS).to_pydict()
    table["petal_width"][3] = -1.0
    ref = store(pa.table(table), run_dir / "bad.parquet")
    state = component.validate(data=ref, out=f"file://{run_dir}/validate", columns=SCHEMA, return_state=True)
    assert state.is_failed()
    first = r"column 'petal_width' failed greater_than_or_equal_to\(0.0\) with '-1.0' at row 3"
    with pytest.raises(ValueError, match=r"validation failed with 1 failure case\(s\); the first: " + first):
        state.result()
    with get_client(sync_client=True) as client:  # the report is published on failure too
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["validate-report"]))
        )
    assert any("150 rows, 1 problems" in a.data and "| petal_width" in a.data for a in artifacts)


def test_flow_passes_valid_data_on_unchanged(prefect_api, run_dir):
    ref = store(pacsv.read_csv(IRIS), run_dir / "iris.parquet")
    result = component.validate(data=ref, out=f"file://{run_dir}/validate", columns=SCHEMA)
    assert result["output"] == ref
    assert [s["column"] for s in result["summary"]] == ref["columns"]
    assert "150 rows, valid" in result["report"]
