"""Validate: check a stored dataset against a declared schema (pandera); fail with a report."""

import hashlib
import os
import resource
from typing import (
    Any,
    Literal,
    NotRequired,  # pydantic needs these for parameters on 3.11
)

import fsspec
import pandera.pandas as pa
import pyarrow.parquet as pq
from prefect import flow, get_client
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from tabulate import tabulate
from typing_extensions import TypedDict

SHOWN_FAILURES = 20  # failure cases in the error and the report
MAX_FAILURES = 1000  # stop reading once this many are found: the report is already clear
DTYPES = {"float": "float64", "int": "int64", "str": "str", "bool": "bool"}


class DataRef(TypedDict):
    """A complete object in the data store, and what it holds."""

    uri: str
    rows: int
    columns: list[str]
    bytes: int
    sha256: str


class ColumnRule(TypedDict):
    """What one column must hold: a type, and optionally bounds or a set of allowed values."""

    type: Literal["float", "int", "str", "bool"]
    min: NotRequired[float]
    max: NotRequired[float]
    allowed: NotRequired[list[str | float]]
    nullable: NotRequired[bool]


class StepResult(TypedDict):
    """What callers get back: the step contract."""

    output: DataRef
    summary: list[dict[str, Any]]
    report: str
    image: str
    peak_rss_bytes: int
    cpu_seconds: float


@flow(name="validate", persist_result=True, result_serializer="json")
def validate(data: DataRef, out: str, columns: dict[str, ColumnRule]) -> StepResult:
    """Check every row of `data` against the declared `columns`; pass `data` on when it holds."""
    image = tag_run_with_image()
    verify(data)
    failures = check(data["uri"], to_pandera(columns))
    # In the data's column order: a schema that comes back from the API has lost its key order.
    names = [c for c in data["columns"] if c in columns] + [c for c in columns if c not in data["columns"]]
    summary = [
        {
            "column": name,
            "type": columns[name]["type"],
            "failures": sum(f["column"] == name for f in failures),
        }
        for name in names
    ]
    report = render_report(data, summary, failures)
    create_markdown_artifact(key="validate-report", markdown=report, description=data["uri"])
    if failures:
        first = failures[0]
        raise ValueError(
            f"validation failed with {len(failures)}{'+' if len(failures) >= MAX_FAILURES else ''} failure "
            f"case(s); the first: column {first['column']!r} failed {first['check']} with "
            f"{first['failure_case']!r} at row {first['row']} (report: artifact validate-report)"
        )
    return StepResult(output=data, summary=summary, report=report, image=image, **usage())


def to_pandera(schema: dict[str, ColumnRule]) -> pa.DataFrameSchema:
    """The declared schema as a pandera schema."""
    columns = {}
    for name, rule in schema.items():
        checks = []
        if "min" in rule:
            checks.append(pa.Check.ge(rule["min"]))
        if "max" in rule:
            checks.append(pa.Check.le(rule["max"]))
        if "allowed" in rule:
            checks.append(pa.Check.isin(rule["allowed"]))
        columns[name] = pa.Column(DTYPES[rule["type"]], checks, coerce=True, nullable=rule.get("nullable", False))
    return pa.DataFrameSchema(columns)


def check(uri: str, schema: pa.DataFrameSchema) -> list[dict[str, Any]]:
    """Every failure case, batch by batch, up to MAX_FAILURES."""
    failures: list[dict[str, Any]] = []
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as file:
        offset = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=1 << 20):
            try:
                schema.validate(batch.to_pandas(), lazy=True)
            except pa.errors.SchemaErrors as exc:
                for case in exc.failure_cases.to_dict(orient="records"):
                    row = None if case["index"] is None else offset + int(case["index"])
                    failures.append({**case, "row": row, "failure_case": str(case["failure_case"])})
            offset += batch.num_rows
            if len(failures) >= MAX_FAILURES:
                break
    return failures[:MAX_FAILURES]


def render_report(data: DataRef, summary: list[dict[str, Any]], failures: list[dict[str, Any]]) -> str:
    """A markdown report: per column, and the first failure cases."""
    verdict = f"{len(failures)} problems" if failures else "valid"
    report = f"### `{data['uri']}`: {data['rows']} rows, {verdict}\n\n"
    report += tabulate(summary, headers="keys", tablefmt="github")
    if failures:
        shown = [{k: f[k] for k in ("column", "check", "failure_case", "row")} for f in failures]
        report += "\n\n" + tabulate(shown[:SHOWN_FAILURES], headers="keys", tablefmt="github")
    return report + "\n"


def verify(ref: DataRef) -> None:
    """Fail unless the stored object exists and matches its reference byte for byte."""
    fs, path = fsspec.core.url_to_fs(ref["uri"])
    if not fs.exists(path):
        raise FileNotFoundError(f"stored object missing: {ref['uri']}")
    digest = hashlib.sha256()
    with fs.open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != ref["sha256"]:
        raise ValueError(f"stored object corrupt: {ref['uri']} does not match its sha256")


def usage() -> dict[str, Any]:
    """This process's peak memory and CPU time: what the run cost."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_bytes": own.ru_maxrss * 1024, "cpu_seconds": round(own.ru_utime + own.ru_stime, 3)}


def tag_run_with_image() -> str:
    """Tag this run with the image it runs in (set by the work pool): the UI shows what ran."""
    image = os.environ.get("COMPONENT_IMAGE", "unknown")
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=[*flow_run.tags, f"image:{image}"])
    return image
