"""Unit tests of the join component on real Parquet in a local store, without Docker."""

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from conftest import IRIS
from join import join as component
from stepkit import DataRef, parts_of, write_parquet

GROUPS = pa.table({"species": ["setosa", "versicolor", "virginica"], "count": [50, 50, 50],
                   "mean_petal_length": [1.462, 4.26, 5.552]})  # fmt: skip


@pytest.fixture
def iris(run_dir) -> DataRef:
    return write_parquet(pacsv.read_csv(IRIS), f"file://{run_dir}/input.parquet")


def read(ref: DataRef) -> pa.Table:
    return pa.concat_tables(pq.read_table(part["uri"].removeprefix("file://")) for part in parts_of(ref))


def test_each_row_gets_its_groups_columns_in_the_rows_order(prefect_api, iris, run_dir):
    groups = write_parquet(GROUPS, f"file://{run_dir}/groups.parquet")
    result = component.join(rows=iris, groups=groups, out=f"file://{run_dir}/join")
    joined, rows = read(result["output"]), pacsv.read_csv(IRIS)
    assert joined.column_names == [*rows.column_names, "count", "mean_petal_length"]
    assert joined.select(rows.column_names).equals(rows)  # every row, in its order
    assert set(joined["count"].to_pylist()) == {50}
    first = joined.slice(0, 1).to_pylist()[0]
    assert (first["species"], first["mean_petal_length"]) == ("setosa", 1.462)
    assert result["summary"] == [{"rows": 150, "groups": 3, "columns": 7}]


def test_groups_must_be_one_row_each_and_hold_the_key(prefect_api, iris, run_dir):
    twice = write_parquet(pa.table({"species": ["a", "a"], "count": [1, 2]}), f"file://{run_dir}/twice.parquet")
    state = component.join(rows=iris, groups=twice, out=f"file://{run_dir}/join", return_state=True)
    with pytest.raises(ValueError, match="groups has 2 rows for fewer distinct 'species': one row per group"):
        state.result()
    keyless = write_parquet(pa.table({"count": [1]}), f"file://{run_dir}/keyless.parquet")
    state = component.join(rows=iris, groups=keyless, out=f"file://{run_dir}/join", return_state=True)
    with pytest.raises(
        ValueError, match=r"input groups .* does not hold what it requires: 'species' \(string\) is missing"
    ):
        state.result()
