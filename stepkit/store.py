"""The data store through fsspec: atomic writes that hash as they write, reads that check the
sha256 as they read."""

import hashlib
import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stepkit.contract import WIRE, DataRef, Part, check_wire

if TYPE_CHECKING:  # pyarrow is imported where it is used: the cli image deploys steps without it
    import pyarrow as pa

CHUNK = 1 << 20
OUT_OF_ORDER_CACHE = 64 << 20  # bytes read ahead of the hash (a Parquet footer) kept for it
SMALL_GAP = 4096  # a forward skip this small is hashed at once (Parquet's magic bytes)


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


def write_parquet(table: "pa.Table", uri: str, **options: Any) -> DataRef:
    """Store `table` as Parquet at `uri` (pyarrow's write options, e.g. row_group_size),
    atomically; its reference."""
    import pyarrow.parquet as pq

    with atomic_write(uri) as sink:
        pq.write_table(table, sink, **options)
    return DataRef(
        wire=WIRE, uri=uri, rows=table.num_rows, columns=table.schema.names,
        bytes=sink.bytes, sha256=sink.sha256.hexdigest(),
    )  # fmt: skip


class VerifyingReader(io.RawIOBase):
    """A seekable read-only view of a stored object that hashes every byte once, in order, as the
    reader asks for them, and checks the whole against its reference at `finish()`.

    Readers such as Parquet's jump to the footer first: bytes read ahead of the hash are kept
    (up to OUT_OF_ORDER_CACHE) until the hash reaches them, and what the reader skips is read at
    `finish()` to hash it. So each byte is fetched once, whatever the read pattern, unless more
    than OUT_OF_ORDER_CACHE is read out of order.
    """

    def __init__(self, file: Any, ref: DataRef):
        self._file, self._ref = file, ref
        self._pos = self._hashed = 0
        self._sha = hashlib.sha256()
        self._ahead: dict[int, bytes] = {}  # offset -> bytes read beyond the hash
        self.size = file.seek(0, io.SEEK_END)
        self.fetched = 0  # bytes read from the store: the tests hold this to about one size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._pos + size)
        if end <= self._pos:
            return b""
        if self._pos > self._hashed and self._pos - self._hashed <= SMALL_GAP:
            self._advance(self._pos)  # hash it now rather than keep all that follows
        data = self._bytes(self._pos, end)
        if self._pos <= self._hashed < end:
            self._sha.update(data[self._hashed - self._pos :])
            self._hashed = end
        elif self._pos > self._hashed and sum(map(len, self._ahead.values())) + len(data) <= OUT_OF_ORDER_CACHE:
            self._ahead[self._pos] = data
        self._pos = end
        return data

    def _fetch(self, start: int, end: int) -> bytes:
        self._file.seek(start)
        data = self._file.read(end - start)
        self.fetched += len(data)
        return data

    def _bytes(self, start: int, end: int) -> bytes:
        """The bytes from `start` to `end`: from those kept ahead where they cover them, else fetched."""
        parts, at = [], start
        for offset, data in sorted(self._ahead.items()):
            if offset + len(data) <= at or offset >= end:
                continue
            if offset > at:
                parts.append(self._fetch(at, offset))
                at = offset
            parts.append(data[at - offset : end - offset])
            at += len(parts[-1])
        if at < end:
            parts.append(self._fetch(at, end))
        return b"".join(parts)

    def _advance(self, end: int) -> None:
        """Hash up to `end`, from the bytes kept ahead where they cover it, else from the store."""
        while self._hashed < end:
            piece = self._bytes(self._hashed, min(end, self._hashed + CHUNK))
            if not piece:
                break
            self._sha.update(piece)
            self._hashed += len(piece)
        self._ahead = {o: d for o, d in self._ahead.items() if o + len(d) > self._hashed}

    def finish(self) -> None:
        """Hash what the reader skipped; fail unless the object matches its reference."""
        self._advance(self.size)
        if self._hashed != self._ref["bytes"] or self._sha.hexdigest() != self._ref["sha256"]:
            raise ValueError(f"stored object corrupt: {self._ref['uri']} does not match its sha256")


def parts_of(ref: DataRef) -> list[DataRef]:
    """The Parquet objects of a dataset, in order, each as a one-part reference."""
    if "parts" not in ref:
        return [ref]
    return [DataRef(wire=ref["wire"], columns=ref["columns"], **part) for part in ref["parts"]]


def dataset_of(parts: list[DataRef]) -> DataRef:
    """One reference to `parts`, read in order as one dataset: the part itself if there is one.
    Its sha256 hashes the parts' sha256s, so it names the content wherever the parts are stored."""
    if not parts:
        raise ValueError("a dataset needs at least one part")
    flat = [p for ref in parts for p in parts_of(ref)]
    if len(flat) == 1:
        return flat[0]
    columns = flat[0]["columns"]
    if other := next((p for p in flat if p["columns"] != columns), None):
        raise ValueError(f"parts of a dataset differ in columns: {other['uri']} has {other['columns']}, not {columns}")
    return DataRef(
        wire=WIRE, uri=shared_directory([p["uri"] for p in flat]),
        rows=sum(p["rows"] for p in flat), columns=columns, bytes=sum(p["bytes"] for p in flat),
        sha256=hashlib.sha256("\n".join(p["sha256"] for p in flat).encode()).hexdigest(),
        parts=[Part(uri=p["uri"], rows=p["rows"], bytes=p["bytes"], sha256=p["sha256"]) for p in flat],
    )  # fmt: skip


def shared_directory(uris: list[str]) -> str:
    """The deepest directory that holds every one of `uris`."""
    shared: list[str] = []
    for names in zip(*(uri.rsplit("/", 1)[0].split("/") for uri in uris), strict=False):
        if len(set(names)) > 1:
            break
        shared.append(names[0])
    return "/".join(shared)


@contextmanager
def open_verified(ref: DataRef) -> Iterator[VerifyingReader]:
    """Open a referenced Parquet object for one verified read; the caller calls `finish()` when done."""
    check_wire(ref)
    if "parts" in ref:
        raise ValueError(f"{ref['uri']} is a dataset of {len(ref['parts'])} parts: open each of parts_of(ref)")
    fs, path = fsspec.core.url_to_fs(ref["uri"])
    try:
        file = fs.open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"stored object missing: {ref['uri']}") from None
    with file:
        yield VerifyingReader(file, ref)


def verify(ref: DataRef) -> None:
    """Fail unless every stored object of the dataset exists and matches its reference byte for byte."""
    check_wire(ref)
    for part in parts_of(ref):
        with open_verified(part) as reader:
            reader.finish()
