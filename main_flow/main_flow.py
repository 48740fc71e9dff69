"""Main flow: load a CSV into the data store as Parquet, run the pipeline's steps on it by
reference, and store the pipeline output next to it."""

import asyncio
import hashlib
import io
import ipaddress
import json
import os
import resource
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, BinaryIO
from uuid import UUID

import anyio
import fsspec
import httpx
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from botocore.exceptions import ConnectionError as BotoConnectionError  # s3fs's client: S3 unreachable
from fsspec.implementations.local import LocalFileSystem
from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import TERMINAL_STATES, FlowRun
from prefect.deployments import run_deployment
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Cancelled, Cancelling
from prefect.utilities.asyncutils import run_coro_as_sync
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode
from typing_extensions import TypedDict  # pydantic needs it for parameters on Python 3.11


# The contract with every step: a step takes `data` (a DataRef) and `out` (where it writes its
# outputs) plus parameters of its own, and returns at least STEP_RESULT. tests/test_contract.py
# checks every deployment named in prefect.yaml's `steps` against it.
class DataRef(TypedDict):
    """A complete object in the data store, and what it holds."""

    uri: str
    rows: int
    columns: list[str]
    bytes: int
    sha256: str


STEP_RESULT: dict[str, type] = {"output": dict, "summary": list, "report": str, "image": str}
StepName = Annotated[str, Field(pattern=r"^[\w.-]+/[\w.-]+$")]
MAX_REDIRECTS = 5
SAFETY_READ_S = 5.0  # reads of the steps' runs besides the event stream, should an event be lost
FINAL = {state.value for state in TERMINAL_STATES}  # as events label them
CHUNK = 1 << 20


class Settings(BaseSettings):
    """Operator settings, from the container's environment (set by the work pool's template)."""

    pipeline_data_url: str  # PIPELINE_DATA_URL, from .env through the pool template
    source_dir: Path = Path(__file__).resolve().parent / "data"
    # Absolute path prefixes and URL hosts that sources may use besides the defaults.
    source_allow_prefixes: Annotated[list[Path], NoDecode] = []
    source_allow_hosts: Annotated[list[str], NoDecode] = []

    @field_validator("source_allow_prefixes", "source_allow_hosts", mode="before")
    @classmethod
    def comma_separated(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


class PipelineError(RuntimeError):
    """A step did not deliver a usable result."""


class SourceUnavailable(ConnectionError):
    """The source could not be reached: worth a retry."""


class StoreUnavailable(ConnectionError):
    """The data store could not be reached (after its client's own retries): worth a retry."""


@flow(name="main-flow")
def main_flow(
    source: Annotated[str, Field(min_length=1)] = "iris.csv",
    steps: list[StepName | list[StepName]] | None = None,
    data: DataRef | None = None,
    images: dict[StepName, str] | None = None,
    max_bytes: Annotated[int, Field(ge=1)] = 4 << 30,
    fetch_timeout_s: Annotated[float, Field(ge=1)] = 1800.0,
    step_timeout_s: Annotated[float, Field(ge=1)] = 1800.0,
) -> dict[str, Any]:
    """Load `source` into the store and run `steps` on it; `data` and `images` replay a past run."""
    settings = Settings()
    image = tag_run_with_image()
    groups = step_groups(steps or [])
    run_dir = f"{settings.pipeline_data_url.rstrip('/')}/runs/{flow_run.id}"
    if data is None:
        data = ingest(source, f"{run_dir}/input.parquet", settings, max_bytes, fetch_timeout_s)
    else:
        verify(data)  # a replay: fail here, before any step runs, if the input is gone
    get_run_logger().info("input: %d rows, %d bytes at %s", data["rows"], data["bytes"], data["uri"])
    results: dict[str, dict[str, Any]] = {}
    current = data
    for group in groups:
        done = run_group(group, current, run_dir, images or {}, step_timeout_s)
        results.update(done)
        current = done[group[0]]["output"]  # after a parallel group, its first step's output
    output = {
        "main_flow_run_id": str(flow_run.id),
        "main_image": image,
        "source": source,
        "steps": steps or [],
        "input": data,
        "results": results,
        "output_uri": f"{run_dir}/output.json",
        **usage(),
    }
    with atomic_write(output["output_uri"]) as file:
        file.write(json.dumps(output, indent=2).encode())
    create_markdown_artifact(
        key="pipeline-output",
        markdown="\n\n".join([f"Output: `{output['output_uri']}`"] + [r["report"] for r in results.values()]),
        description=f"Pipeline output for {source}",
    )
    return output


def step_groups(steps: list[str | list[str]]) -> list[list[str]]:
    """The steps as groups that run one after another; refuse a step listed twice."""
    groups = [step if isinstance(step, list) else [step] for step in steps]
    names = [name for group in groups for name in group]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated or any(not group for group in groups):
        raise ValueError(f"invalid steps {steps}: each step once, no empty groups (repeated: {repeated})")
    return groups


# --- ingest: source -> Parquet in the store, streamed, never held in memory ---------------------


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only if the source or the store was out of reach: bad data would fail the same way."""
    try:
        state.result()
    except (ConnectionError, httpx.TransportError):
        return True
    except Exception:
        return False
    return False


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient)
def ingest(source: str, uri: str, settings: Settings, max_bytes: int, timeout_s: float) -> DataRef:
    """Stream `source` (CSV) into `uri` (Parquet), validating it on the way."""
    deadline = time.monotonic() + timeout_s
    with open_source(source, settings, max_bytes, deadline) as stream:
        try:
            # The reader infers column types from its first block and checks every row after.
            # One thread: a flow container has one CPU (pools/docker.json), and an error stops it at once.
            options = pacsv.ReadOptions(block_size=4 << 20, use_threads=False)
            reader = pacsv.open_csv(stream, read_options=options)
            columns = reader.schema.names
            if any(not name.strip() for name in columns) or len(set(columns)) != len(columns):
                raise ValueError(f"malformed dataset {source!r}: blank or repeated column names {columns}")
            rows = 0
            with atomic_write(uri) as sink, pq.ParquetWriter(sink, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
                if rows == 0:
                    raise ValueError(f"empty dataset {source!r}: a header but no data rows")
        except pa.ArrowInvalid as exc:
            raise ValueError(f"malformed dataset {source!r}: {describe(exc)}") from exc
        except BotoConnectionError as exc:
            raise StoreUnavailable(f"cannot reach the data store to write {uri}: {exc}") from exc
    return DataRef(uri=uri, rows=rows, columns=columns, bytes=sink.bytes, sha256=sink.sha256.hexdigest())


def describe(exc: pa.ArrowInvalid) -> str:
    """Say what a CSV reader error means for the user's file."""
    text = str(exc)
    if text == "Empty CSV file":
        return "no header row (the file is empty)"
    if text.startswith("In CSV column #"):
        return f"a column changes type after the first rows ({text}; column #0 is the first)"
    if "Expected" in text and "columns" in text:
        return f"a row has a different number of fields than the header ({text})"
    return text


@contextmanager
def open_source(source: str, settings: Settings, max_bytes: int, deadline: float) -> Iterator[BinaryIO]:
    """A capped, deadline-bound binary stream of an http(s) URL or of a file in the data directory.

    Buffered, so the CSV reader gets whole blocks however the network chunks the bytes: the
    same input always gives the same Parquet, byte for byte.
    """
    if "://" in source:
        with open_url(source, settings, deadline) as response:
            size = int(response.headers.get("content-length") or 0)
            if size > max_bytes:
                raise ValueError(f"source {source!r} is {size} bytes, over max_bytes={max_bytes}")
            yield io.BufferedReader(Capped(response.iter_bytes(), source, max_bytes, deadline), CHUNK)
        return
    path = source_path(source, settings)
    with path.open("rb") as file:
        yield io.BufferedReader(Capped(iter(lambda: file.read(CHUNK), b""), source, max_bytes, deadline), CHUNK)


def source_path(source: str, settings: Settings) -> Path:
    """A file source, resolved inside the data directory (or an allowed prefix), never outside."""
    roots = [settings.source_dir.resolve(), *(p.resolve() for p in settings.source_allow_prefixes)]
    path = (settings.source_dir / source).resolve()  # an absolute `source` replaces source_dir
    if not any(path.is_relative_to(root) for root in roots):
        raise ValueError(
            f"source {source!r} is outside the data directory {settings.source_dir}: use a path "
            "inside it, or allow a prefix with SOURCE_ALLOW_PREFIXES"
        )
    if not path.is_file():
        raise FileNotFoundError(f"source file not found: {path}")
    return path


@contextmanager
def open_url(url: str, settings: Settings, deadline: float) -> Iterator[httpx.Response]:
    """GET `url`, following at most MAX_REDIRECTS redirects, each to a permitted host."""
    timeout = httpx.Timeout(min(30.0, max(deadline - time.monotonic(), 1.0)))
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url, settings.source_allow_hosts)
            try:
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = str(response.url.join(response.headers["location"]))
                        continue
                    if response.is_error:
                        raise ValueError(f"cannot fetch source {url!r}: HTTP {response.status_code}")
                    yield response
                    return
            except httpx.TransportError as exc:
                raise SourceUnavailable(f"cannot fetch source {url!r}: {exc!r}") from exc
    raise ValueError(f"cannot fetch source: more than {MAX_REDIRECTS} redirects, the last to {url!r}")


def check_url(url: str, allow_hosts: list[str]) -> None:
    """Refuse non-http(s) URLs and hosts with loopback, private, link-local or reserved addresses."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"source {url!r}: only http and https URLs are allowed")
    if parsed.host in allow_hosts:
        return
    try:
        infos = socket.getaddrinfo(parsed.host, parsed.port or 443, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SourceUnavailable(f"cannot fetch source {url!r}: cannot resolve {parsed.host!r}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise ValueError(
                f"source {url!r}: host {parsed.host!r} has the non-public address {address}; "
                "allow it with SOURCE_ALLOW_HOSTS if it is a trusted data server"
            )


class Capped(io.RawIOBase):
    """A readable stream over byte chunks that stops at a size cap and a deadline."""

    def __init__(self, chunks: Iterator[bytes], source: str, max_bytes: int, deadline: float):
        self._chunks, self._pending = chunks, b""
        self._source, self._max_bytes, self._deadline = source, max_bytes, deadline
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if time.monotonic() > self._deadline:
            raise TimeoutError(f"source {self._source!r} was not read within fetch_timeout_s")
        while not self._pending:
            self._pending = next(self._chunks, b"")
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        self.bytes_read += n
        if self.bytes_read > self._max_bytes:
            raise ValueError(f"source {self._source!r} is larger than max_bytes={self._max_bytes}")
        return n


# --- the data store ------------------------------------------------------------------------------


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
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != ref["sha256"]:
        raise ValueError(f"stored object corrupt: {ref['uri']} does not match its sha256")


# --- steps -----------------------------------------------------------------------------------


def run_group(
    group: list[str],
    data: DataRef,
    run_dir: str,
    images: dict[str, str],
    timeout_s: float,
) -> dict[str, dict[str, Any]]:
    """Run the steps of a group at once on `data`; their results by deployment name."""
    started = {name: start_step(name, data, f"{run_dir}/{name.split('/')[1]}", images.get(name)) for name in group}
    finished = wait_for_runs(started, timeout_s)
    failed = [
        f"step {name} (run {run.name!r}) ended {run.state.name}: {run.state.message}"
        for name, run in finished.items()
        if not run.state.is_completed()
    ]
    if failed:
        raise PipelineError("; ".join(failed))
    return {name: step_result(name, run) for name, run in finished.items()}


def start_step(name: str, data: DataRef, out: str, image: str | None) -> FlowRun:
    """Create the child run of one step; `image` pins its image (a replay)."""
    try:
        return run_deployment(
            name,
            parameters={"data": data, "out": out},
            timeout=0,  # return at once: wait_for_runs waits for the whole group
            job_variables={"image": image} if image else None,
        )
    except ObjectNotFound as exc:
        raise PipelineError(
            f"deployment {name!r} not found: register it with `prefect deploy --name {name.split('/')[1]}`"
        ) from exc


def wait_for_runs(runs: dict[str, FlowRun], timeout_s: float) -> dict[str, FlowRun]:
    """Wait until every run is final; cancel the rest and fail at the deadline."""
    names = {run.id: name for name, run in runs.items()}
    finished = run_coro_as_sync(until_final(list(names), time.monotonic() + timeout_s))
    waiting = [run for run in finished if not final(run)]
    if waiting:
        with get_client(sync_client=True) as client:
            for run in waiting:
                cancel(client, run, f"main flow stopped waiting after {timeout_s}s")
        raise PipelineError("; ".join(not_finished(run, timeout_s) for run in waiting))
    return {names[run.id]: run for run in finished}


async def until_final(ids: list[UUID], deadline: float) -> list[FlowRun]:
    """Read the runs whenever the server's event stream reports a state of one of them (and every
    few seconds besides) until all are final or the deadline passes: no polling interval to wait out."""
    states = EventFilter(
        event=EventNameFilter(prefix=["prefect.flow-run."]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}" for run_id in ids]),
    )
    async with get_client() as client, get_events_subscriber(filter=states) as events:
        stream, soon = aiter(events), False
        while True:
            runs = await asyncio.gather(*(client.read_flow_run(run_id) for run_id in ids))
            left = deadline - time.monotonic()
            if all(final(run) for run in runs) or left <= 0:
                return runs
            with anyio.move_on_after(0.1 if soon else min(SAFETY_READ_S, left)):
                soon = False
                event = await anext(stream)
                # A final state's event can come before reads show it: then read again soon.
                soon = event.resource.get("prefect.state-type") in FINAL


def not_finished(run: FlowRun, timeout_s: float) -> str:
    state = run.state.name if run.state else "unknown"
    return (
        f"step run {run.name!r} did not finish within {timeout_s}s (state {state}); it was cancelled. "
        f"Check that a worker is polling work pool {run.work_pool_name!r}."
    )


def final(run: FlowRun) -> bool:
    return run.state is not None and run.state.is_final()


def cancel(client: Any, run: FlowRun, reason: str) -> None:
    """Cancel a child run that will not be waited for: never leave it queued forever."""
    started = run.state is not None and run.state.is_running()
    # A run that has not started is cancelled outright; a running one through its worker.
    state = Cancelling(message=reason) if started else Cancelled(message=reason)
    client.set_flow_run_state(run.id, state, force=True)


def step_result(name: str, run: FlowRun) -> dict[str, Any]:
    """A finished step's result, checked against the contract."""
    result = run.state.result()
    wrong = [k for k, kind in STEP_RESULT.items() if not isinstance(result.get(k), kind)]
    if wrong:
        raise PipelineError(f"step {name} returned a result that lacks or mistypes {wrong}: {str(result)[:300]}")
    return {**result, "flow_run_id": str(run.id)}


def usage() -> dict[str, float]:
    """This process's peak memory and CPU time: what the run cost."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_bytes": own.ru_maxrss * 1024, "cpu_seconds": round(own.ru_utime + own.ru_stime, 3)}


def tag_run_with_image() -> str:
    """Tag this run with the image it runs in (set by the work pool): the UI shows what ran."""
    image = os.environ.get("COMPONENT_IMAGE", "unknown")
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=[*flow_run.tags, f"image:{image}"])
    return image
