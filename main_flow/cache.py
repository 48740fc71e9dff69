"""The step cache: a step's result is reused, and its container never started, when its key is
unchanged. The key hashes the step's name, its image digest, its own parameters, the sha256 of
its input and the kit's wire format. An entry, <store>/cache/<key>.json, is written only after
the step completed, and its outputs are written atomically before that: the entry is the commit
marker. Entries are signed with the key only main flows hold (stepkit/signature.py): one a step
forged or rewrote is not used. A hit is checked again: an output that is missing or changed makes
it a miss."""

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import fsspec
from prefect.logging import get_logger

from stepkit import WIRE, DataRef, RefusedReference, atomic_write, parts_of, signature, verify
from stepkit.layout import cache_root, confined, runs_root

INGEST = "ingest"  # the main flow's own step: source to input.parquet
ALL = "all"
Refresh = list[str] | Literal["all"]

log = get_logger("cache")  # under prefect.*: in a flow run, its records reach the run's log


class Entry(TypedDict):
    """A cache entry: the step's result, and the main run that computed it."""

    key: str
    step: str
    run: str
    result: dict[str, Any]
    signature: str


def key(
    step: str, image: str, parameters: dict[str, Any], inputs: list[str], pipeline: str | None = None
) -> str | None:
    """The cache key of `step` run by `image` on `inputs` (sha256s) with `parameters` in
    `pipeline` (a pipeline reads only its own runs' data: the workers mount no other's); None,
    so not cached, unless the image is pinned by digest (a tag can move)."""
    if "@sha256:" not in image:
        return None
    parts = {
        "step": step,
        "image": image,
        "parameters": parameters,
        "inputs": inputs,
        "wire": WIRE,
        "pipeline": pipeline,
    }
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def checked(refresh: Refresh, steps: set[str]) -> Refresh:
    """`refresh`, if it names only steps of this run (or the ingest): a misspelt step would
    otherwise be reused silently."""
    unknown = [] if refresh == ALL else sorted(set(refresh) - steps - {INGEST})
    if unknown:
        raise ValueError(f"refresh names {unknown}, which are not steps of this run: {sorted(steps)} or {INGEST!r}")
    return refresh


def entry_uri(key: str) -> str:
    return f"{cache_root()}/{key}.json"


def references(result: dict[str, Any]) -> list[DataRef]:
    """Every stored object a result points to: its `output`, and any other reference among its keys."""
    return [v for v in result.values() if isinstance(v, dict) and {"uri", "sha256", "bytes"} <= v.keys()]


def lookup(key: str, verified: set[tuple[str, str]] | None = None) -> Entry | None:
    """The entry for `key` if every object its outputs are made of is in the runs' part of the
    store and matches its sha256; else None (never an error: the step is computed). `verified` holds the
    (uri, sha256) already read in full, e.g. an input that validate passed on: read once."""
    verified = set() if verified is None else verified
    try:
        with fsspec.open(entry_uri(key), "rb") as file:
            entry: Entry = signature.verified(json.loads(file.read()), f"cache entry {key[:12]}")
        for part in (part for ref in references(entry["result"]) for part in parts_of(ref)):
            confined(part["uri"], runs_root())
            if (part["uri"], part["sha256"]) not in verified:
                verify(part)
                verified.add((part["uri"], part["sha256"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, RefusedReference) as exc:  # corrupt, forged (Unsigned), changed, refused
        log.warning("cache entry %s not used: %s", key[:12], exc)
        return None
    return entry


def record(key: str, step: str, run: str, result: dict[str, Any]) -> None:
    """Write the entry for `key`, signed, atomically: concurrent writers of one key leave one whole entry."""
    entry = signature.signed({"key": key, "step": step, "run": run, "result": result})
    with atomic_write(entry_uri(key)) as file:
        file.write(json.dumps(entry, indent=2).encode())


@dataclass(frozen=True)
class Policy:
    """Which steps may reuse an entry in this run, and which run writes new ones."""

    run: str
    refresh: Refresh = field(default_factory=list)
    off: frozenset[str] = frozenset()  # `cache: false` in the steps
    resume_from: str | None = None  # its own entries are reused even where `cache: false`
    verified: set[tuple[str, str]] = field(default_factory=set)  # outputs this run's lookups read in full
    pipeline: str | None = None  # its main run's deployment: entries are the pipeline's own

    def lookup(self, step: str, key: str | None) -> Entry | None:
        if key is None or self.refresh == ALL or step in self.refresh:
            return None
        entry = lookup(key, self.verified)
        if entry is None or (step in self.off and entry["run"] != self.resume_from):
            return None
        return entry

    def record(self, step: str, key: str | None, result: dict[str, Any]) -> None:
        if key is not None:
            record(key, step, self.run, result)
