"""Subflow: summarise records per group, report it, publish it as a Variable, return it."""

import os
from typing import Any, TypedDict

import pandas as pd
from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.variables import Variable


class SubflowResult(TypedDict):
    """What callers get back: the contract, together with the flow's parameters."""

    rows: int
    groups: int
    summary: list[dict[str, Any]]
    report: str
    variable: str
    image: str


@task
def summarise(records: list[dict[str, Any]], group_by: str) -> list[dict[str, Any]]:
    """Count the rows and average every measurement column of each group."""
    if not records:
        raise ValueError("empty dataset: no records to summarise")
    frame = pd.DataFrame.from_records(records)
    if group_by not in frame.columns:
        raise ValueError(
            f"group column {group_by!r} not in the data (columns: {list(frame.columns)})"
        )
    measures = [column for column in frame.columns if column != group_by]
    if not measures:
        raise ValueError(f"no measurement columns besides {group_by!r}")
    for column in measures:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = frame.loc[values.isna(), column]
        if not bad.empty:
            raise ValueError(
                f"column {column!r} must be numeric: row {bad.index[0]} has {bad.iloc[0]!r}"
            )
        frame[column] = values
    grouped = frame.groupby(group_by, sort=True)
    summary = grouped[measures].mean().round(3).add_prefix("mean_")
    summary.insert(0, "count", grouped.size())
    # to_dict gives plain Python numbers, so the result stays JSON for any caller.
    return summary.reset_index().to_dict(orient="records")


def render_report(summary: list[dict[str, Any]], source: str, rows: int, group_by: str) -> str:
    """A short markdown report of the summary."""
    table = pd.DataFrame.from_records(summary).to_markdown(index=False)
    return f"### {rows} rows from `{source}` in {len(summary)} groups by `{group_by}`\n\n{table}\n"


# JSON results: the caller reads them from the shared volume without importing this module.
@flow(name="subflow", persist_result=True, result_serializer="json")
def subflow(
    records: list[dict[str, Any]], source: str = "unknown", group_by: str = "species"
) -> SubflowResult:
    """Summarise `records` by `group_by`; return the summary and publish it as a Variable."""
    image = tag_run_with_image()
    summary = summarise(records, group_by)
    report = render_report(summary, source, len(records), group_by)
    create_markdown_artifact(key="subflow-report", markdown=report, description=source)
    # One Variable per run: concurrent pipelines never read each other's output.
    variable = f"subflow-output-{flow_run.id}"
    Variable.set(variable, summary, tags=["subflow-output"])
    get_run_logger().info("published the summary as Variable %s", variable)
    return SubflowResult(
        rows=len(records),
        groups=len(summary),
        summary=summary,
        report=report,
        variable=variable,
        image=image,
    )


def tag_run_with_image() -> str:
    """Tag this run with the image it runs in (set by the deployment): the UI shows what ran."""
    image = os.environ.get("COMPONENT_IMAGE", "unknown")
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=[*flow_run.tags, f"image:{image}"])
    return image
