"""Where a source's bytes come from: a public http(s) URL (each address checked, redirects
followed with care), an fsspec URL the operator allows (SOURCE_ALLOW), the store's inbox, or a file
shipped in main_flow/data/; read as a stream capped in size and time, never held in memory."""

import hashlib
import io
import ipaddress
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import fsspec
import httpx
from botocore.exceptions import ConnectionError as BotoConnectionError  # s3fs's client: S3 unreachable
from prefect import task
from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode

from stepkit import RefusedReference, redact
from stepkit.layout import confined, inbox_root

MAX_REDIRECTS = 5
CHUNK = 1 << 20


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
