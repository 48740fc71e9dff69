"""Subflow: summarise a stored dataset per group, store the full summary, publish it as a Variable."""

import hashlib
import json
import os
import resource
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.variables import Variable
from tabulate import tabulate
from typing_extensions import TypedDict  # pydantic needs it for parameters on Python 3.11

SHOWN_GROUPS = 20  # groups in the returned summary and the report; all of them are in the output
VARIABLE_LIMIT = 5000  # Prefect's limit on a Variable's value, in characters of JSON
NUMBER = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"


class DataRef(TypedDict):
    """A complete object in the data store, and what it holds."""

    uri: str
    rows: int
    columns: list[str]
    bytes: int
    sha256: str


class SubflowResult(TypedDict):
    """What callers get back: the step contract, plus the group count and the Variable's name."""

    output: DataRef
    summary: list[dict[str, Any]]
    report: str
    image: str
    rows: int
    groups: int
    variable: str
    peak_rss_bytes: int
    cpu_seconds: float


# JSON results: the caller reads them from the result store without importing this module.
@flow(name="subflow", persist_result=True, result_serializer="json")
def subflow(data: DataRef, out: str, group_by: str = "species") -> SubflowResult:
    """Count the rows and average every measurement of each `group_by` group of `data`."""
    image = tag_run_with_image()
    verify(data)
    table = summarise(data["uri"], group_by)
    output = write_parquet(table, f"{out}/summary.parquet")
    summary = table.slice(0, SHOWN_GROUPS).to_pylist()
    report = render_report(summary, table.num_rows, data, group_by)
    create_markdown_artifact(key="subflow-report", markdown=report, description=data["uri"])
    variable = publish(output, data["rows"], summary)
    return SubflowResult(
        output=output,
        summary=summary,
        report=report,
        image=image,
        rows=data["rows"],
        groups=table.num_rows,
        variable=variable,
        **usage(),
    )


def summarise(uri: str, group_by: str) -> pa.Table:
    """Per group: the row count and the mean of every other column, batch by batch."""
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as file:
        parquet = pq.ParquetFile(file)
        columns = parquet.schema_arrow.names
        if group_by not in columns:
            raise ValueError(f"group column {group_by!r} not in the data (columns: {columns})")
        measures = [c for c in columns if c != group_by]
        if not measures:
            raise ValueError(f"no measurement columns besides {group_by!r}")
        partials, offset = [], 0
        for batch in parquet.iter_batches(batch_size=1 << 20):
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


def write_parquet(table: pa.Table, uri: str) -> DataRef:
    """Store `table` as Parquet at `uri`; its reference."""
    with atomic_write(uri) as sink:
        pq.write_table(table, sink)
    return DataRef(
        uri=uri,
        rows=table.num_rows,
        columns=table.schema.names,
        bytes=sink.bytes,
        sha256=sink.sha256.hexdigest(),
    )


class HashingWriter:
    """A write-only file that passes bytes on and keeps their count and sha256."""

    def __init__(self, file: Any):
        self._file, self.bytes, self.sha256, self.closed = file, 0, hashlib.sha256(), False

    def write(self, data: bytes) -> int:
        self._file.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self.closed = True


@contextmanager
def atomic_write(uri: str) -> Iterator[HashingWriter]:
    """Write an object that appears at `uri` only once complete: nobody ever reads half of it."""
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
        partial = f"{path}.{uuid.uuid4().hex}.partial"  # same directory, so the rename is atomic
        try:
            with fs.open(partial, "wb") as file:
                yield HashingWriter(file)
            fs.mv(partial, path)
        finally:
            if fs.exists(partial):
                fs.rm(partial)
        return
    # Object stores: the upload is completed, and the object appears, only on commit.
    file = fs.open(path, "wb", autocommit=False)
    try:
        yield HashingWriter(file)
        file.close()
        file.commit()
    except BaseException:
        file.discard()
        raise


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
