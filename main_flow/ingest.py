"""Ingest: a CSV source (an http(s) URL or a file shipped in main_flow/data/) streamed into the
store as Parquet parts, validated on the way, never held in memory."""

import hashlib
import io
import ipaddress
import itertools
import operator
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import fsspec
import httpx
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from botocore.exceptions import ConnectionError as BotoConnectionError  # s3fs's client: S3 unreachable
from prefect import task
from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode

from stepkit import WIRE, DataRef, atomic_write, dataset_of, redact
from stepkit.layout import part_name

MAX_REDIRECTS = 5
CHUNK = 1 << 20


class Settings(BaseSettings):
    """Operator settings, from the container's environment (set by the work pool's template)."""

    source_dir: Path = Path(__file__).resolve().parent / "data"
    # URL hosts that sources may use besides public ones (SOURCE_ALLOW_HOSTS, comma-separated).
    source_allow_hosts: Annotated[list[str], NoDecode] = []

    @field_validator("source_allow_hosts", mode="before")
    @classmethod
    def comma_separated(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


class SourceUnavailable(ConnectionError):
    """The source could not be reached: worth a retry."""


class StoreUnavailable(ConnectionError):
    """The data store could not be reached (after its client's own retries): worth a retry."""


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
def ingest(
    source: str, directory: str, settings: Settings, max_bytes: int, timeout_s: float, max_columns: int, part_rows: int
) -> DataRef:
    """Stream `source` (CSV) into `directory` as Parquet parts of `part_rows` rows, validating it
    on the way: the parts are what a mapped step's partitions are made of."""
    deadline = time.monotonic() + timeout_s
    shown = redact(source)  # no credentials or signed query in any message
    parts: list[DataRef] = []
    with open_source(source, settings, max_bytes, deadline) as stream, removed_on_failure(parts):
        try:
            # The reader infers column types from its first block and checks every row after.
            # One thread: a flow container has one CPU (pools/docker.json), and an error stops it at once.
            options = pacsv.ReadOptions(block_size=4 << 20, use_threads=False)
            reader = pacsv.open_csv(stream, read_options=options)
            columns = reader.schema.names
            if len(columns) > max_columns:
                raise ValueError(f"dataset {shown!r} has {len(columns)} columns, over max_columns={max_columns}")
            if any(not name.strip() for name in columns) or len(set(columns)) != len(columns):
                raise ValueError(f"malformed dataset {shown!r}: blank or repeated column names {columns}")
            for index, cut in itertools.groupby(cuts(reader, part_rows), key=operator.itemgetter(0)):
                uri, rows = f"{directory}/{part_name(index)}.parquet", 0
                with atomic_write(uri) as sink, pq.ParquetWriter(sink, reader.schema) as writer:
                    for _, batch in cut:
                        writer.write_batch(batch)
                        rows += batch.num_rows
                parts.append(DataRef(wire=WIRE, uri=uri, rows=rows, columns=columns, bytes=sink.bytes,
                                     sha256=sink.sha256.hexdigest()))  # fmt: skip
            if not parts:
                raise ValueError(f"empty dataset {shown!r}: a header but no data rows")
        except pa.ArrowInvalid as exc:
            raise ValueError(f"malformed dataset {shown!r}: {describe(exc)}") from exc
        except BotoConnectionError as exc:
            raise StoreUnavailable(f"cannot reach the data store to write {directory}: {exc}") from exc
    return dataset_of(parts)


def cuts(batches: Iterator[pa.RecordBatch], part_rows: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """The batches' rows as (part index, slice) pairs, a slice never across parts of `part_rows` rows."""
    row = 0
    for batch in batches:
        while batch.num_rows:
            take = part_rows - row % part_rows
            yield row // part_rows, batch.slice(0, take)
            row += min(take, batch.num_rows)
            batch = batch.slice(take)


@contextmanager
def removed_on_failure(parts: list[DataRef]) -> Iterator[None]:
    """Delete the parts written so far if the ingest fails: nothing of a bad source stays in the store."""
    try:
        yield
    except BaseException:
        for part in parts:
            fs, path = fsspec.core.url_to_fs(part["uri"])
            fs.rm(path)
        raise


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient)
def identity(source: str, settings: Settings, timeout_s: float) -> dict[str, Any] | None:
    """What identifies the source's bytes, cheaply, for the cache: an http(s) URL's validators
    (ETag, Last-Modified) and size as its server sends them, or None if it sends neither; a
    file's sha256."""
    if "://" in source:
        with open_url(source, settings, time.monotonic() + timeout_s) as response:  # headers only
            headers = response.headers
        validators = {name: headers[name] for name in ("etag", "last-modified") if name in headers}
        if not validators or "content-length" not in headers:
            return None
        return {"url": source, **validators, "bytes": int(headers["content-length"])}
    with source_path(source, settings).open("rb") as file:
        return {"file": source, "sha256": hashlib.file_digest(file, "sha256").hexdigest()}


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
                raise ValueError(f"source {redact(source)!r} is {size} bytes, over max_bytes={max_bytes}")
            # Raw bytes: encodings are refused (open_url), so nothing inflates past the cap unseen.
            yield io.BufferedReader(Capped(response.iter_raw(), source, max_bytes, deadline), CHUNK)
        return
    path = source_path(source, settings)
    with path.open("rb") as file:
        yield io.BufferedReader(Capped(iter(lambda: file.read(CHUNK), b""), source, max_bytes, deadline), CHUNK)


def source_path(source: str, settings: Settings) -> Path:
    """A file source, resolved inside the data directory, never outside."""
    path = (settings.source_dir / source).resolve()  # an absolute `source` replaces source_dir
    if not path.is_relative_to(settings.source_dir.resolve()):
        raise ValueError(f"source {source!r} is outside the data directory {settings.source_dir}: use a path inside it")
    if not path.is_file():
        raise FileNotFoundError(f"source file not found: {path}")
    return path


@contextmanager
def open_url(url: str, settings: Settings, deadline: float) -> Iterator[httpx.Response]:
    """GET `url`, following at most MAX_REDIRECTS redirects, each to a permitted host, connecting
    to the very address that was checked (no second DNS answer), and refusing encoded bodies."""
    timeout = httpx.Timeout(min(30.0, max(deadline - time.monotonic(), 1.0)))
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parsed, address = httpx.URL(url), check_url(url, settings.source_allow_hosts)
            pinned = parsed.copy_with(host=address)
            headers = {"Host": parsed.netloc.decode(), "Accept-Encoding": "identity"}
            sni = {"sni_hostname": parsed.host}  # TLS checks the certificate against the name, not the IP
            try:
                with client.stream("GET", pinned, headers=headers, extensions=sni) as response:
                    if response.is_redirect:
                        url = str(parsed.join(response.headers["location"]))
                        continue
                    if response.is_error:
                        raise ValueError(f"cannot fetch source {redact(url)!r}: HTTP {response.status_code}")
                    if response.headers.get("content-encoding", "identity").lower() != "identity":
                        raise ValueError(
                            f"source {redact(url)!r} came with Content-Encoding "
                            f"{response.headers['content-encoding']!r}: refused, its size could not be capped"
                        )
                    yield response
                    return
            except httpx.TransportError as exc:
                raise SourceUnavailable(f"cannot fetch source {redact(url)!r}: {type(exc).__name__}") from exc
    raise ValueError(f"cannot fetch source: more than {MAX_REDIRECTS} redirects, the last to {redact(url)!r}")


def check_url(url: str, allow_hosts: list[str]) -> str:
    """The address to connect to for `url`: refuse non-http(s) URLs and hosts with loopback,
    private, link-local or reserved addresses (unless allowed by name)."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"source {redact(url)!r}: only http and https URLs are allowed")
    try:
        infos = socket.getaddrinfo(parsed.host, parsed.port or 443, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SourceUnavailable(f"cannot fetch source {redact(url)!r}: cannot resolve {parsed.host!r}") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if parsed.host not in allow_hosts:
        for address in addresses:
            if not address.is_global:
                raise ValueError(
                    f"source {redact(url)!r}: host {parsed.host!r} has the non-public address {address}; "
                    "allow it with SOURCE_ALLOW_HOSTS if it is a trusted data server"
                )
    return str(addresses[0])


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
            raise TimeoutError(f"source {redact(self._source)!r} was not read within fetch_timeout_s")
        while not self._pending:
            self._pending = next(self._chunks, b"")
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        self.bytes_read += n
        if self.bytes_read > self._max_bytes:
            raise ValueError(f"source {redact(self._source)!r} is larger than max_bytes={self._max_bytes}")
        return n
