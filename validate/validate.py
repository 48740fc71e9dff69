"""Validate: check a stored dataset against a declared schema (pandera); fail with a report."""

from typing import Any, Literal, NotRequired

import pandera.pandas as pa
from tabulate import tabulate
from typing_extensions import TypedDict  # pydantic needs it for parameters on Python 3.11

from stepkit import DataRef, Dataset, Output, StepFailed, step

SHOWN_FAILURES = 20  # failure cases in the error and the report
BATCH_BYTES = 8 << 20  # Arrow bytes per batch: pandas needs several times as much
MAX_FAILURES = 1000  # stop reading once this many are found: the report is already clear
DTYPES = {"float": "float64", "int": "int64", "str": "str", "bool": "bool"}


class ColumnRule(TypedDict):
    """What one column must hold: a type, and optionally bounds or a set of allowed values."""

    type: Literal["float", "int", "str", "bool"]
    min: NotRequired[float]
    max: NotRequired[float]
    allowed: NotRequired[list[str | float]]
    nullable: NotRequired[bool]


@step
def validate(data: Dataset, columns: dict[str, ColumnRule]) -> Output:
    """Check every row of `data` against the declared `columns`; pass `data` on when it holds."""
    failures = check(data, to_pandera(columns))
    # In the data's column order: a schema that comes back from the API has lost its key order.
    ref = data.ref
    names = [c for c in ref["columns"] if c in columns] + [c for c in columns if c not in ref["columns"]]
    summary = [
        {"column": name, "type": columns[name]["type"], "failures": sum(f["column"] == name for f in failures)}
        for name in names
    ]
    report = render_report(ref, summary, failures)
    if failures:
        first = failures[0]
        raise StepFailed(
            f"validation failed with {len(failures)}{'+' if len(failures) >= MAX_FAILURES else ''} failure "
            f"case(s); the first: column {first['column']!r} failed {first['check']} with "
            f"{first['failure_case']!r} at row {first['row']} (report: artifact validate-report)",
            report,
        )
    return Output(ref, summary, report)


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


def check(data: Dataset, schema: pa.DataFrameSchema) -> list[dict[str, Any]]:
    """Every failure case, batch by batch, up to MAX_FAILURES."""
    failures: list[dict[str, Any]] = []
    offset = 0
    for batch in data.batches(BATCH_BYTES):
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
