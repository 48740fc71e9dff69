"""Subflow: summarise a stored dataset per group, store the full summary, publish it as a Variable."""

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger
from prefect.runtime import flow_run
from prefect.variables import Variable
from tabulate import tabulate

from stepkit import DataRef, Dataset, Out, Output, step

SHOWN_GROUPS = 20  # groups in the returned summary and the report; all of them are in the output
VARIABLE_LIMIT = 5000  # Prefect's limit on a Variable's value, in characters of JSON
NUMBER = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"


@step
def subflow(data: Dataset, out: Out, group_by: str = "species") -> Output:
    """Count the rows and average every measurement of each `group_by` group of `data`."""
    table = summarise(data, group_by)
    output = out.write_table(table, "summary.parquet")
    summary = table.slice(0, SHOWN_GROUPS).to_pylist()
    report = render_report(summary, table.num_rows, data.ref, group_by)
    variable = publish(output, data.ref["rows"], summary)
    return Output(
        output, summary, report, extra={"rows": data.ref["rows"], "groups": table.num_rows, "variable": variable}
    )


def summarise(data: Dataset, group_by: str) -> pa.Table:
    """Per group: the row count and the mean of every other column, batch by batch."""
    columns = data.schema.names
    if group_by not in columns:
        raise ValueError(f"group column {group_by!r} not in the data (columns: {columns})")
    measures = [c for c in columns if c != group_by]
    if not measures:
        raise ValueError(f"no measurement columns besides {group_by!r}")
    partials, offset = [], 0
    for batch in data.batches():
        table = pa.Table.from_batches([batch])
        for name in measures:
            table = table.set_column(table.schema.get_field_index(name), name, numeric(table[name], name, offset))
        aggregates = [(m, "sum") for m in measures] + [(m, "count") for m in measures]
        partials.append(table.group_by(group_by).aggregate([*aggregates, ([], "count_all")]))
        offset += batch.num_rows
    totals = (
        pa.concat_tables(partials)
        .group_by(group_by)
        .aggregate([(f"{m}_{kind}", "sum") for m in measures for kind in ("sum", "count")] + [("count_all", "sum")])
    )
    result = {group_by: totals[group_by], "count": totals["count_all_sum"]}
    for m in measures:
        result[f"mean_{m}"] = pc.round(
            pc.divide(totals[f"{m}_sum_sum"], pc.cast(totals[f"{m}_count_sum"], pa.float64())), 3
        )
    return pa.table(result).sort_by(group_by)


def numeric(column: pa.ChunkedArray, name: str, offset: int) -> pa.ChunkedArray:
    """The column as float64, or an error naming the first row that is not a number."""
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return pc.cast(column, pa.float64())
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = pc.utf8_trim_whitespace(column)
        bad = pc.invert(pc.fill_null(pc.match_substring_regex(column, NUMBER), True))
        if not pc.any(bad).as_py():
            return pc.cast(column, pa.float64())
        row = pc.index(bad, True).as_py()
        raise ValueError(f"column {name!r} must be numeric: row {offset + row} has {column[row].as_py()!r}")
    raise ValueError(f"column {name!r} must be numeric, not {column.type}")


def render_report(summary: list[dict[str, Any]], groups: int, data: DataRef, group_by: str) -> str:
    """A short markdown report: the first groups, and how many more the output holds."""
    table = tabulate(summary, headers="keys", tablefmt="github")
    more = f"\n\n... and {groups - len(summary)} more groups in the output" if groups > len(summary) else ""
    heading = f"### {data['rows']} rows from `{data['uri']}` in {groups} groups by `{group_by}`"
    return f"{heading}\n\n{table}{more}\n"


def publish(output: DataRef, rows: int, summary: list[dict[str, Any]]) -> str:
    """Publish the output's pointer and as many groups as fit Prefect's Variable limit."""
    groups = output["rows"]
    value: dict[str, Any] = {"output": output["uri"], "rows": rows, "groups": groups, "summary": []}
    for group in summary:
        # -1: `"truncated": false` below is one character longer than `true`.
        candidate = {**value, "summary": [*value["summary"], group], "truncated": True}
        if len(json.dumps(candidate)) > VARIABLE_LIMIT - 1:
            break
        value["summary"].append(group)
    value["truncated"] = len(value["summary"]) < groups
    # One Variable per run: concurrent pipelines never read each other's output.
    name = f"subflow-output-{flow_run.id}"
    Variable.set(name, value, tags=["subflow-output"])
    get_run_logger().info("published %d of %d groups as Variable %s", len(value["summary"]), groups, name)
    return name
