"""Ingest: a source (sources.py) in any of its formats (formats.py), streamed into the store as
Parquet parts, validated on the way, never held in memory."""

import itertools
import operator
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from botocore.exceptions import ConnectionError as BotoConnectionError  # s3fs's client: S3 unreachable
from fsspec.implementations.local import LocalFileSystem
from prefect import task

from main_flow.formats import checked, decompressed, describe, detect
from main_flow.sources import CHUNK, Settings, open_source, transient
from stepkit import WIRE, DataRef, atomic_write, dataset_of, redact
from stepkit.layout import part_name


class StoreUnavailable(ConnectionError):
    """The data store could not be reached (after its client's own retries): worth a retry."""


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
