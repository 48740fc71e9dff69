"""The `@step` decorator: a function of (input dataset, own parameters) becomes a Prefect flow
with the contract's signature (`data`, `out`, own parameters) and result."""

import inspect
import json
import os
import resource
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.flows import Flow
from prefect.runtime import flow_run

from stepkit.contract import DataRef, StepResult, check_wire
from stepkit.layout import RefusedReference, RunLayout, confined, run_id_of, runs_root
from stepkit.store import VerifyingReader, atomic_write, open_verified, parts_of, write_parquet

if TYPE_CHECKING:  # pyarrow is imported where it is used: the cli image deploys steps without it
    import pyarrow as pa
    import pyarrow.parquet as pq


BATCH_BYTES = 32 << 20  # a batch's size in memory, whatever the width of a row
RESULT = "result.json"  # a step's result, in its output directory


def batches(parquet: "pq.ParquetFile", max_bytes: int = BATCH_BYTES) -> Iterator["pa.RecordBatch"]:
    """`parquet`'s rows in order, in record batches of about `max_bytes` in memory: sized by
    bytes, not rows, so a wide table cannot blow a step's memory limit."""
    rows = max(1, max_bytes * parquet.metadata.num_rows // max(decoded_size(parquet), 1))
    yield from parquet.iter_batches(batch_size=rows)


def decoded_size(parquet: "pq.ParquetFile") -> int:
    """About the bytes `parquet`'s rows take in memory. Parquet's own sizes are of encoded data,
    and a dictionary-encoded column (a few distinct values) is tiny there: 10M rows of such
    columns counted 30 MB, and read 12.5M rows, over 1 GB, in one batch. So each column counts
    at least its Arrow width per row (a string: its longest value in the statistics, and its offset)."""
    meta = parquet.metadata
    encoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    flat = meta.num_columns == len(parquet.schema_arrow)  # else columns are not fields: no statistics
    width = 0
    for index, column in enumerate(parquet.schema_arrow):
        try:
            width += max(1, column.type.bit_width // 8)
        except ValueError:  # variable width
            stats = [meta.row_group(i).column(index).statistics for i in range(meta.num_row_groups)] if flat else []
            longest = [len(v) for s in stats if s is not None and s.has_min_max for v in (s.min, s.max)]
            width += 4 + max(longest, default=8)
    return max(encoded, width * meta.num_rows)


class Dataset:
    """The step's input, opened once: one Parquet object or several parts read in order as one
    dataset. Every byte is hashed as the step reads it."""

    def __init__(self, ref: DataRef, readers: list[VerifyingReader]):
        self.ref, self._readers = ref, readers

    @classmethod
    @contextmanager
    def open(cls, ref: DataRef) -> Iterator["Dataset"]:
        """The dataset `ref`, every part opened for a verified read."""
        with ExitStack() as opened:
            readers = []
            for part in parts_of(ref):
                try:
                    readers.append(opened.enter_context(open_verified(part)))
                except FileNotFoundError:  # missing reads as every other refusal: no oracle
                    raise RefusedReference(part["uri"]) from None
            yield cls(ref, readers)

    @property
    def schema(self) -> "pa.Schema":
        """The columns and their types (every part has the same)."""
        return self._parquet(0).schema_arrow

    def batches(self, max_bytes: int = BATCH_BYTES) -> Iterator["pa.RecordBatch"]:
        """The rows in order, part after part, in record batches of about `max_bytes` each."""
        schema = self.schema
        for i, part in enumerate(parts_of(self.ref)):
            parquet = self._parquet(i)
            if not parquet.schema_arrow.equals(schema):
                raise ValueError(f"part {part['uri']} has the schema {parquet.schema_arrow}, not the first part's")
            yield from batches(parquet, max_bytes)

    def _parquet(self, i: int) -> "pq.ParquetFile":
        import pyarrow.parquet as pq

        return pq.ParquetFile(self._readers[i])

    def finish(self) -> None:
        """Hash what the step did not read, and fail unless every part matches its reference."""
        for reader in self._readers:
            reader.finish()


class Out:
    """Where the step writes its outputs (the `out` of the contract)."""

    def __init__(self, uri: str, data: Dataset):
        self.uri, self._data = uri.rstrip("/"), data

    def write_table(self, table: "pa.Table", name: str) -> DataRef:
        """Store `table` as Parquet at out/`name`, atomically; its reference. The input is
        verified first, so nothing is written from an input that does not match its reference."""
        self._data.finish()
        return write_parquet(table, f"{self.uri}/{name}")


class StepFailed(ValueError):
    """The step's verdict on its input (e.g. validation failed), with the report to publish."""

    def __init__(self, message: str, report: str):
        super().__init__(message)
        self.report = report


def verified_or_raise_from(data: Dataset, exc: Exception) -> None:
    """After the step's logic failed: if the input was corrupt, say that instead."""
    try:
        data.finish()
    except ValueError as corrupt:
        raise corrupt from exc


@dataclass
class Output:
    """What a step's logic returns: its output reference, a small summary, a markdown report,
    and any extra keys of its own for the result."""

    output: DataRef
    summary: list[dict[str, Any]]
    report: str
    extra: dict[str, Any] = field(default_factory=dict)


def step(fn: Callable[..., Output]) -> Flow:
    """Make `fn(data: Dataset, [out: Out,] **own) -> Output` a flow `<fn's name>(data: DataRef,
    out: str, **own) -> StepResult`: it verifies the input as it is read, publishes the report as
    the artifact `<name>-report` (also when the logic raises StepFailed), adds the run's usage, and
    stores the result as out/result.json, where the main flow reads it."""

    def wrap(fn: Callable[..., Output]) -> Flow:
        flow_name = fn.__name__.replace("_", "-")
        signature = inspect.signature(fn)
        own = [p for p in signature.parameters.values() if p.name not in ("data", "out")]
        wants_out = "out" in signature.parameters

        def run(**parameters: Any) -> StepResult:
            ref, out = parameters.pop("data"), parameters.pop("out")
            confine(ref, out)
            with Dataset.open(ref) as data:
                try:
                    result = fn(data=data, **({"out": Out(out, data)} if wants_out else {}), **parameters)
                    data.finish()
                except StepFailed as exc:
                    data.finish()  # a corrupt input is named as such, not as the step's verdict on it
                    create_markdown_artifact(key=f"{flow_name}-report", markdown=exc.report, description=ref["uri"])
                    raise
                except Exception as exc:
                    verified_or_raise_from(data, exc)
                    raise
            check_wire(result.output, f"step {flow_name}")
            create_markdown_artifact(key=f"{flow_name}-report", markdown=result.report, description=ref["uri"])
            returned: StepResult = {
                **result.extra,
                "output": result.output,
                "summary": result.summary,
                "report": result.report,
                "image": component_image(),
                **usage(),
            }
            with atomic_write(result_uri(out)) as file:
                file.write(json.dumps(returned).encode())
            return returned

        # Prefect reads the parameter schema and validates calls from the signature: the contract's.
        keyword = inspect.Parameter.KEYWORD_ONLY
        run.__signature__ = inspect.Signature(
            [
                inspect.Parameter("data", keyword, annotation=DataRef),
                inspect.Parameter("out", keyword, annotation=str),
                *(p.replace(kind=keyword) for p in own),
            ],
            return_annotation=StepResult,
        )
        run.__annotations__ = {
            "data": DataRef, "out": str, **{p.name: p.annotation for p in own}, "return": StepResult,
        }  # fmt: skip
        for attribute in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(run, attribute, getattr(fn, attribute))
        # The result travels in the store (out/result.json), where only this run writes: not in
        # Prefect's result storage, which every run would share.
        return flow(name=flow_name, persist_result=False)(run)

    return wrap(fn)


def confine(ref: DataRef, out: str) -> None:
    """A step reads only inside the store's runs/, and writes only inside the directory of the
    main run that started it (run by hand: of the run its input belongs to). Every refusal says
    the same, so none tells what exists outside."""
    uris = [confined(str(part.get("uri", "")), runs_root()) for part in parts_of(ref)]
    owner = flow_run.parent_flow_run_id or run_id_of(uris[0])
    confined(out, RunLayout.of(owner).dir)


def usage() -> dict[str, Any]:
    """This process's peak memory and CPU time: what the run cost."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_bytes": own.ru_maxrss * 1024, "cpu_seconds": round(own.ru_utime + own.ru_stime, 3)}


def component_image() -> str:
    """The image this run runs in, by digest, as its worker says (the worker also tags the run with it)."""
    return os.environ.get("COMPONENT_IMAGE", "unknown")


def result_uri(out: str) -> str:
    """Where a step run stores its result: in its own output directory."""
    return f"{out.rstrip('/')}/{RESULT}"
