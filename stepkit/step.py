"""The `@step` decorator: a function of (input datasets, own parameters) becomes a Prefect flow
with the contract's signature (`data` or named inputs, `out`, own parameters) and result."""

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
from prefect.runtime import flow_run

from stepkit.contract import DATA, Columns, Contract, DataRef, StepResult, check_wire
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

    def read(self) -> "pa.Table":
        """The whole dataset as one table: for inputs that fit in memory (say, a join's sides)."""
        import pyarrow as pa

        return pa.Table.from_batches(list(self.batches()), schema=self.schema)

    def _parquet(self, i: int) -> "pq.ParquetFile":
        import pyarrow.parquet as pq

        return pq.ParquetFile(self._readers[i])

    def finish(self) -> None:
        """Hash what the step did not read, and fail unless every part matches its reference."""
        for reader in self._readers:
            reader.finish()


class Out:
    """Where the step writes its outputs (the `out` of the contract)."""

    def __init__(self, uri: str, *inputs: Dataset):
        self.uri, self._inputs = uri.rstrip("/"), inputs

    def write_table(self, table: "pa.Table", name: str) -> DataRef:
        """Store `table` as Parquet at out/`name`, atomically; its reference. The inputs are
        verified first, so nothing is written from an input that does not match its reference."""
        for data in self._inputs:
            data.finish()
        return write_parquet(table, f"{self.uri}/{name}")


class StepFailed(ValueError):
    """The step's verdict on its input (e.g. validation failed), with the report to publish."""

    def __init__(self, message: str, report: str):
        super().__init__(message)
        self.report = report


def verified_or_raise_from(inputs: dict[str, Dataset], exc: Exception) -> None:
    """After the step's logic failed: if an input was corrupt, say that instead."""
    for data in inputs.values():
        try:
            data.finish()
        except ValueError as corrupt:
            raise corrupt from exc


def columns_of(schema: "pa.Schema") -> Columns:
    """Each column's type as a contract names it: a dictionary-encoded column as its values' type."""
    import pyarrow as pa

    def kind(t: pa.DataType) -> str:
        t = t.value_type if pa.types.is_dictionary(t) else t
        return {"large_string": "string", "large_binary": "binary"}.get(str(t), str(t))

    return {field.name: kind(field.type) for field in schema}


def unmet(columns: Columns, declared: Columns) -> list[str]:
    """How `columns` fall short of `declared`: each column missing or of another type."""
    return [
        f"{name!r} ({kind}) is missing" if name not in columns else f"{name!r} is {columns[name]}, not {kind}"
        for name, kind in declared.items()
        if columns.get(name) != kind
    ]


@dataclass
class Output:
    """What a step's logic returns: its output reference, a small summary, a markdown report,
    and any extra keys of its own for the result."""

    output: DataRef
    summary: list[dict[str, Any]]
    report: str
    extra: dict[str, Any] = field(default_factory=dict)


def step(
    fn: Callable[..., Output] | None = None,
    *,
    requires: Columns | dict[str, Columns] | None = None,
    produces: Columns | None = None,
) -> Any:
    """Make `fn(data: Dataset, [out: Out,] **own) -> Output` a flow `<fn's name>(data: DataRef,
    out: str, **own) -> StepResult`: it verifies the input as it is read, publishes the report as
    the artifact `<name>-report` (also when the logic raises StepFailed), adds the run's usage, and
    stores the result as out/result.json, where the main flow reads it.

    A step of several inputs takes each as a `Dataset` parameter of its own name (`left:
    Dataset, right: Dataset`). `requires` (columns and their types, by input where there are
    several) and `produces` are its contract: `prefect deploy` checks every edge of a pipeline
    against them (stepkit/graph.py), and each run checks its inputs and its output."""
    if fn is None:
        return lambda fn: step(fn, requires=requires, produces=produces)
    flow_name = fn.__name__.replace("_", "-")
    signature = inspect.signature(fn)
    inputs = [p.name for p in signature.parameters.values() if p.annotation in (Dataset, "Dataset")] or [DATA]
    own = [p for p in signature.parameters.values() if p.name not in (*inputs, "out")]
    wants_out = "out" in signature.parameters
    contract = Contract.of(inputs, requires, produces)

    def run(**parameters: Any) -> StepResult:
        refs, out = {name: parameters.pop(name) for name in inputs}, parameters.pop("out")
        for ref in refs.values():
            confine(ref, out)
        described = next(iter(refs.values()))["uri"]
        with ExitStack() as opened:
            data = {name: opened.enter_context(Dataset.open(ref)) for name, ref in refs.items()}
            for name, declared in contract.requires.items():
                if short := unmet(columns_of(data[name].schema), declared):
                    raise ValueError(f"step {flow_name}: input {name} ({refs[name]['uri']}) does not hold what it "
                                     f"requires: {'; '.join(short)}")  # fmt: skip
            try:
                result = fn(**data, **({"out": Out(out, *data.values())} if wants_out else {}), **parameters)
                for dataset in data.values():
                    dataset.finish()
            except StepFailed as exc:
                for dataset in data.values():  # a corrupt input is named as such, not as the step's verdict on it
                    dataset.finish()
                create_markdown_artifact(key=f"{flow_name}-report", markdown=exc.report, description=described)
                raise
            except Exception as exc:
                verified_or_raise_from(data, exc)
                raise
        check_wire(result.output, f"step {flow_name}")
        if produces is not None:
            with Dataset.open(result.output) as output:
                if short := unmet(columns_of(output.schema), produces):
                    raise ValueError(f"step {flow_name} declares what it produces, but its output "
                                     f"{result.output['uri']} does not hold it: {'; '.join(short)}")  # fmt: skip
        create_markdown_artifact(key=f"{flow_name}-report", markdown=result.report, description=described)
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
    run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            *(inspect.Parameter(name, keyword, annotation=DataRef) for name in inputs),
            inspect.Parameter("out", keyword, annotation=str),
            *(p.replace(kind=keyword) for p in own),
        ],
        return_annotation=StepResult,
    )
    run.__annotations__ = {
        **dict.fromkeys(inputs, DataRef), "out": str, **{p.name: p.annotation for p in own}, "return": StepResult,
    }  # fmt: skip
    for attribute in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(run, attribute, getattr(fn, attribute))
    # The result travels in the store (out/result.json), where only this run writes: not in
    # Prefect's result storage, which every run would share.
    made = flow(name=flow_name, persist_result=False)(run)
    made.contract = contract  # what `prefect deploy` checks a pipeline's edges against
    return made


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
