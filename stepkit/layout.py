"""The run layout in the data store, defined once:

<store>/runs/<main run id>/input/part-NNNNN.parquet  the ingested source, in parts of part_rows rows
<store>/runs/<main run id>/<step>/...                each step's own outputs (<step>: its deployment
                                                     name), with its result.json; a mapped step's in
                                                     part-NNNNN/, one each
<store>/runs/<main run id>/output.json               the pipeline output, signed
<store>/cache/<key>.json                             the step cache's entries (main_flow/cache.py)
<store>/inbox/<sha256>/<name>                        files uploaded as sources (tools/inbox.py), by content
"""

import os
from dataclasses import dataclass

RUNS = "runs"
CACHE = "cache"
INBOX = "inbox"


def store_url() -> str:
    """The data store, PIPELINE_DATA_URL (from .env through the pool template), without a trailing /."""
    url = os.environ.get("PIPELINE_DATA_URL", "").rstrip("/")
    if not url:
        raise RuntimeError("PIPELINE_DATA_URL is not set: the work pool's template sets it from .env")
    return url


@dataclass(frozen=True)
class RunLayout:
    """Where one main run's objects live in the store."""

    store: str
    run_id: str

    @classmethod
    def of(cls, run_id: object, store: str | None = None) -> "RunLayout":
        return cls((store or store_url()).rstrip("/"), str(run_id))

    @property
    def dir(self) -> str:
        return f"{self.store}/{RUNS}/{self.run_id}"

    @property
    def input(self) -> str:
        """The directory of the ingested source's parts."""
        return f"{self.dir}/input"

    @property
    def output(self) -> str:
        return f"{self.dir}/output.json"

    def step(self, name: str, partition: int | None = None) -> str:
        """A step's own directory, from its `flow/deployment` name; a mapped step's partition's in it."""
        directory = f"{self.dir}/{name.split('/')[-1]}"
        return directory if partition is None else f"{directory}/{part_name(partition)}"


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def runs_root() -> str:
    return f"{store_url().rstrip('/')}/{RUNS}"


def cache_root() -> str:
    return f"{store_url().rstrip('/')}/{CACHE}"


def inbox_root() -> str:
    return f"{store_url().rstrip('/')}/{INBOX}"


class RefusedReference(ValueError):
    """A reference outside what a step may read or write: one message for every reason, so a
    refusal tells nothing about what exists elsewhere."""

    def __init__(self, uri: str):
        super().__init__(f"reference refused: {redact(uri)} is not in this run's part of the data store")


def confined(uri: str, directory: str) -> str:
    """`uri` if it names something inside `directory` of the store, in the store's own protocol,
    with no step outside it (no `..`, no fsspec chaining, no query); else RefusedReference."""
    rest = uri.removeprefix(f"{directory.rstrip('/')}/")
    parts = rest.split("/")
    if rest == uri or any(c in uri for c in ("::", "?", "#", "\\", "%")) or any(p in ("", ".", "..") for p in parts):
        raise RefusedReference(uri)
    return uri


def redact(uri: str) -> str:
    """`uri` without credentials, query or fragment: safe for messages, outputs and artifacts."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri.split("?", 1)[0].split("#", 1)[0]
    authority, slash, path = rest.partition("/")
    host = authority.rsplit("@", 1)[-1]
    return f"{scheme}://{host}{slash}{path.split('?', 1)[0].split('#', 1)[0]}"


def run_id_of(uri: str) -> str | None:
    """The main run an object of the store belongs to, or None."""
    marker = f"/{RUNS}/"
    return uri.split(marker, 1)[1].split("/", 1)[0] if marker in uri else None
