"""Ingest: a source (an http(s) URL, an fsspec URL the operator allows, a file uploaded to the
store's inbox or shipped in main_flow/data/) in CSV, gzip or zstd CSV, or Parquet, streamed into
the store as Parquet parts, validated on the way, never held in memory."""

import hashlib
import io
import ipaddress
import itertools
import operator
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO
from urllib.parse import urlsplit

import fsspec
import httpx
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from botocore.exceptions import ConnectionError as BotoConnectionError  # s3fs's client: S3 unreachable
from fsspec.implementations.local import LocalFileSystem
from prefect import task
from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode

from stepkit import WIRE, DataRef, RefusedReference, atomic_write, dataset_of, redact
from stepkit.layout import confined, inbox_root, part_name

MAX_REDIRECTS = 5
CHUNK = 1 << 20
# Formats by their first bytes (anything else is read as CSV), and the names that promise one.
MAGIC = {b"PAR1": "Parquet", b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
SUFFIXES = {".parquet": "Parquet", ".pq": "Parquet", ".gz": "gzip", ".zst": "zstd", ".zip": "zip", ".csv": "CSV"}
SUFFIXES |= dict.fromkeys((".json", ".jsonl", ".ndjson"), "JSON")


class Settings(BaseSettings):
    """Operator settings, from the container's environment (set by the work pool's template)."""

    source_dir: Path = Path(__file__).resolve().parent / "data"
    # What sources may read besides public http(s) URLs, the store's inbox and source_dir
    # (SOURCE_ALLOW, comma-separated URL prefixes): s3://bucket/prefix/ or any fsspec URL whose
    # file system the image has, and http(s) servers on private addresses.
    source_allow: Annotated[list[str], NoDecode] = []
    # The most parts an input may have (MAX_INPUT_PARTS): part_rows cannot make millions of files.
    max_input_parts: int

    @field_validator("source_allow", mode="before")
    @classmethod
    def comma_separated(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("source_allow")
    @classmethod
    def url_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if "://" not in prefix:
                raise ValueError(f"SOURCE_ALLOW entry {prefix!r} is not a URL prefix such as s3://bucket/raw/")
        return [prefix if prefix.endswith("/") else f"{prefix}/" for prefix in value]  # s3://b is not s3://b2


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
    """Stream `source` into `directory` as Parquet parts of `part_rows` rows, validating it on the
    way: the parts are what a mapped step's partitions are made of."""
    deadline = time.monotonic() + timeout_s
    shown = redact(source)  # no credentials or signed query in any message
    cut = Parts(part_rows, settings.max_input_parts)
    parts: list[DataRef] = []
    written: list[str] = []
    with open_source(source, settings, max_bytes, deadline) as stream, removed_on_failure(written, directory):
        try:
            found = detect(stream, source)
            if found == "Parquet":
                parts = parquet_parts(stream, shown, directory, max_columns, cut, written)
            else:
                if found in ("gzip", "zstd"):  # capped on the bytes it inflates to, not on what it reads
                    stream = decompressed(stream, found, source, max_bytes, deadline)
                # The reader infers column types from its first block and checks every row after.
                # One thread: a flow container has one CPU (pools/docker.json), and an error stops it at once.
                options = pacsv.ReadOptions(block_size=4 << 20, use_threads=False)
                reader = pacsv.open_csv(stream, read_options=options)
                checked(reader.schema.names, shown, max_columns)
                parts = write_parts(reader, reader.schema, directory, cut, written)
            if not parts:
                raise ValueError(f"empty dataset {shown!r}: a header but no data rows")
        except pa.ArrowInvalid as exc:
            raise ValueError(f"malformed dataset {shown!r}: {describe(exc)}") from exc
        except BotoConnectionError as exc:
            raise StoreUnavailable(f"cannot reach the data store to write {directory}: {exc}") from exc
    return dataset_of(parts)


def checked(columns: list[str], shown: str, max_columns: int) -> None:
    """Refuse too many, blank or repeated column names."""
    if len(columns) > max_columns:
        raise ValueError(f"dataset {shown!r} has {len(columns)} columns, over max_columns={max_columns}")
    if any(not name.strip() for name in columns) or len(set(columns)) != len(columns):
        raise ValueError(f"malformed dataset {shown!r}: blank or repeated column names {columns}")


@dataclass(frozen=True)
class Parts:
    """How the input is cut: parts of `rows` rows, at most `most` of them."""

    rows: int
    most: int


def write_parts(
    batches: Iterator[pa.RecordBatch], schema: pa.Schema, directory: str, cut: Parts, written: list[str]
) -> list[DataRef]:
    """The batches as Parquet parts of `cut.rows` rows in `directory`, each written atomically."""
    parts = []
    for index, slices in itertools.groupby(cuts(batches, cut.rows), key=operator.itemgetter(0)):
        if index >= cut.most:
            raise ValueError(
                f"the source makes more than {cut.most} parts of part_rows={cut.rows} rows "
                "(MAX_INPUT_PARTS): raise part_rows"
            )
        uri, rows = f"{directory}/{part_name(index)}.parquet", 0
        with atomic_write(uri) as sink, pq.ParquetWriter(sink, schema) as writer:
            for _, batch in slices:
                writer.write_batch(batch)
                rows += batch.num_rows
        written.append(uri)
        parts.append(DataRef(wire=WIRE, uri=uri, rows=rows, columns=schema.names, bytes=sink.bytes,
                             sha256=sink.sha256.hexdigest()))  # fmt: skip
    return parts


def parquet_parts(
    stream: BinaryIO, shown: str, directory: str, max_columns: int, cut: Parts, written: list[str]
) -> list[DataRef]:
    """A Parquet source: copied into the store as it is (Parquet needs seeks: a stream has none),
    then kept byte for byte as the one part if it fits in one, else re-encoded into parts."""
    staged = f"{directory}/source.parquet"
    with atomic_write(staged) as sink:
        while chunk := stream.read(CHUNK):
            sink.write(chunk)
    written.append(staged)
    fs, path = fsspec.core.url_to_fs(staged)
    with fs.open(path, "rb") as file:
        source = pq.ParquetFile(file)
        columns, rows = source.schema_arrow.names, source.metadata.num_rows
        checked(columns, shown, max_columns)
        parts = (
            write_parts(source.iter_batches(65_536), source.schema_arrow, directory, cut, written)
            if rows > cut.rows
            else []
        )
    if parts:  # re-encoded: the copy goes
        fs.rm(path)
        written.remove(staged)
        return parts
    if not rows:
        return []
    uri = f"{directory}/{part_name(0)}.parquet"
    fs.mv(path, fsspec.core.url_to_fs(uri)[1])  # a rename on the volume, a server-side copy on S3
    written[written.index(staged)] = uri
    return [DataRef(wire=WIRE, uri=uri, rows=rows, columns=columns, bytes=sink.bytes, sha256=sink.sha256.hexdigest())]


def detect(stream: io.BufferedReader, source: str) -> str:
    """The source's format by its first bytes; refused if its name promises another, or a zip."""
    head = stream.peek(4)[:4]
    found = next((name for magic, name in MAGIC.items() if head.startswith(magic)), "CSV")
    if found == "CSV" and stream.peek(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"["):
        found = "JSON"  # would otherwise pass as a CSV of odd columns
    suffix = PurePosixPath(urlsplit(redact(source)).path).suffix.lower()
    if SUFFIXES.get(suffix, found) != found and head:  # no bytes: the CSV reader says so
        raise ValueError(f"source {redact(source)!r} is named {suffix} ({SUFFIXES[suffix]}) but its content is {found}")
    if found == "zip":
        raise ValueError(f"source {redact(source)!r} is a zip archive: compress a CSV with gzip or zstd instead")
    if found == "JSON":
        raise ValueError(f"source {redact(source)!r} is JSON: not read; convert it to CSV or Parquet")
    return found


def decompressed(stream: BinaryIO, codec: str, source: str, max_bytes: int, deadline: float) -> BinaryIO:
    """The inflated bytes of a gzip or zstd stream, capped at `max_bytes` and the deadline."""
    inflating = pa.CompressedInputStream(stream, codec)

    def chunks() -> Iterator[bytes]:
        while True:
            try:
                chunk = inflating.read(CHUNK)
            except OSError as exc:
                if type(exc) is not OSError:  # the source's own (a timeout, a lost connection): as it is
                    raise
                raise ValueError(f"source {redact(source)!r} is not valid {codec} data: {exc}") from exc
            if not chunk:
                return
            yield chunk

    return io.BufferedReader(Capped(chunks(), source, max_bytes, deadline, " once decompressed"), CHUNK)


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
def removed_on_failure(written: list[str], directory: str) -> Iterator[None]:
    """Delete the objects written so far, and their directory on a volume, if the ingest fails:
    nothing of a bad source stays in the store."""
    try:
        yield
    except BaseException:
        for uri in written:
            fs, path = fsspec.core.url_to_fs(uri)
            fs.rm(path)
        fs, path = fsspec.core.url_to_fs(directory)
        if isinstance(fs, LocalFileSystem) and fs.isdir(path) and not fs.ls(path):
            fs.rmdir(path)
        raise


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient)
def identity(source: str, settings: Settings, timeout_s: float) -> dict[str, Any] | None:
    """What identifies the source's bytes, cheaply, for the cache: an http(s) URL's validators
    (ETag, Last-Modified) and size as its server sends them, an object's ETag or modification
    time and size, or None if there are none; a shipped file's sha256."""
    kind = scheme(source)
    if kind in ("http", "https"):
        with open_url(source, settings, time.monotonic() + timeout_s) as response:  # headers only
            headers = response.headers
        validators = {name: headers[name] for name in ("etag", "last-modified") if name in headers}
        if not validators or "content-length" not in headers:
            return None
        return {"url": source, **validators, "bytes": int(headers["content-length"])}
    if kind:
        fs, path = file_system(source, settings)
        info = opened(source, lambda: fs.info(path))
        version = {name: str(info[name]) for name in ("ETag", "VersionId", "LastModified", "mtime") if name in info}
        return {"url": source, **version, "bytes": info["size"]} if version else None
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


def scheme(source: str) -> str | None:
    """The source's URL scheme, or None for a file shipped in the data directory."""
    return source.split("://", 1)[0].lower() if "://" in source else None


@contextmanager
def open_source(source: str, settings: Settings, max_bytes: int, deadline: float) -> Iterator[io.BufferedReader]:
    """A capped, deadline-bound binary stream of the source's bytes as stored (compressed or not).

    Buffered, so the CSV reader gets whole blocks however the network chunks the bytes: the
    same input always gives the same Parquet, byte for byte.
    """
    kind = scheme(source)
    if kind in ("http", "https"):
        with open_url(source, settings, deadline) as response:
            size = int(response.headers.get("content-length") or 0)
            if size > max_bytes:
                raise ValueError(f"source {redact(source)!r} is {size} bytes, over max_bytes={max_bytes}")
            # Raw bytes: encodings are refused (open_url), so nothing inflates past the cap unseen.
            yield io.BufferedReader(Capped(response.iter_raw(), source, max_bytes, deadline), CHUNK)
        return
    if kind:
        fs, path = file_system(source, settings)
        size = opened(source, lambda: fs.size(path))
        if size > max_bytes:
            raise ValueError(f"source {redact(source)!r} is {size} bytes, over max_bytes={max_bytes}")
        with opened(source, lambda: fs.open(path, "rb")) as file:
            yield io.BufferedReader(Capped(iter(lambda: file.read(CHUNK), b""), source, max_bytes, deadline), CHUNK)
        return
    path = source_path(source, settings)
    with path.open("rb") as file:
        yield io.BufferedReader(Capped(iter(lambda: file.read(CHUNK), b""), source, max_bytes, deadline), CHUNK)


def file_system(source: str, settings: Settings) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system and path of an fsspec URL under the store's inbox or a SOURCE_ALLOW prefix."""
    inbox = f"{inbox_root()}/"
    for prefix in (inbox, *settings.source_allow):
        if source.startswith(prefix) and not prefix.startswith(("http://", "https://")):
            try:
                confined(source, prefix)  # no .., no fsspec chaining (a::b), no query
            except RefusedReference:
                refused = "a path with '..', '::', '?', '#' or '%' is refused"
                raise ValueError(f"source {redact(source)!r}: {refused}") from None
            try:
                return fsspec.core.url_to_fs(source)
            except (ImportError, ValueError) as exc:
                raise ValueError(f"source {redact(source)!r}: no file system for it in the main image ({exc})") from exc
    allowed = ", ".join(settings.source_allow) or "nothing else"
    raise ValueError(
        f"source {redact(source)!r} is refused: sources are public http(s) URLs, files in the store's inbox "
        f"{inbox} (make run SOURCE=./file) or under a prefix of SOURCE_ALLOW ({allowed})"
    )


def opened(source: str, call: Any) -> Any:
    """`call()` on the source's file system, its failures said in the source's terms."""
    try:
        return call()
    except FileNotFoundError:
        raise FileNotFoundError(f"source not found: {redact(source)}") from None
    except (BotoConnectionError, ConnectionError) as exc:
        raise SourceUnavailable(f"cannot fetch source {redact(source)!r}: {exc}") from exc


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
            parsed, address = httpx.URL(url), check_url(url, settings.source_allow)
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


def check_url(url: str, allowed: list[str]) -> str:
    """The address to connect to for `url`: refuse non-http(s) URLs and hosts with loopback,
    private, link-local or reserved addresses (unless under an allowed prefix)."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"source {redact(url)!r}: a redirect may only lead to an http or https URL")
    try:
        infos = socket.getaddrinfo(parsed.host, parsed.port or 443, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SourceUnavailable(f"cannot fetch source {redact(url)!r}: cannot resolve {parsed.host!r}") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not any(redact(str(parsed)).startswith(prefix) for prefix in allowed):  # httpx resolves ../ first
        for address in addresses:
            if not address.is_global:
                origin = f"{parsed.scheme}://{parsed.netloc.decode()}/"
                raise ValueError(
                    f"source {redact(url)!r}: host {parsed.host!r} has the non-public address {address}; "
                    f"allow it with SOURCE_ALLOW (e.g. {origin}) if it is a trusted data server"
                )
    return str(addresses[0])


class Capped(io.RawIOBase):
    """A readable stream over byte chunks that stops at a size cap and a deadline."""

    def __init__(self, chunks: Iterator[bytes], source: str, max_bytes: int, deadline: float, what: str = ""):
        self._chunks, self._pending = chunks, b""
        self._source, self._max_bytes, self._deadline, self._what = source, max_bytes, deadline, what
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
            raise ValueError(f"source {redact(self._source)!r} is larger than max_bytes={self._max_bytes}{self._what}")
        return n
