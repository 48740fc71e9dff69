"""What a source's bytes are: CSV, gzip or zstd CSV, or Parquet, told by their first bytes and
checked against the name; inflated under the same caps; a CSV reader's error said in the user's terms."""

import io
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit

import pyarrow as pa

from main_flow.sources import CHUNK, Capped
from stepkit import redact

# Formats by their first bytes (anything else is read as CSV), and the names that promise one.
MAGIC = {b"PAR1": "Parquet", b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
SUFFIXES = {".parquet": "Parquet", ".pq": "Parquet", ".gz": "gzip", ".zst": "zstd", ".zip": "zip", ".csv": "CSV"}
SUFFIXES |= dict.fromkeys((".json", ".jsonl", ".ndjson"), "JSON")


def checked(columns: list[str], shown: str, max_columns: int) -> None:
    """Refuse too many, blank or repeated column names."""
    if len(columns) > max_columns:
        raise ValueError(f"dataset {shown!r} has {len(columns)} columns, over max_columns={max_columns}")
    if any(not name.strip() for name in columns) or len(set(columns)) != len(columns):
        raise ValueError(f"malformed dataset {shown!r}: blank or repeated column names {columns}")


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
