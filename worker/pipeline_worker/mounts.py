"""Which part of the data store a flow container gets, on a host whose store is its data volume
(PIPELINE_DATA_URL a file:// URL): the worker binds those directories and files of the volume,
never all of it.

- a main flow: its own run's directory read-write, the cache read-write (it signs the entries),
  the other runs read-only (it verifies the cache's hits and a replay's input), and its source if
  that is a file of the inbox, read-only;
- a step: its own output directory read-write, and each file of its input read-only;
- a maintenance flow (retention): the whole volume;
- any other flow: nothing of the store.

Docker 20.10 has no volume subpaths: these are binds of the volume's own directory on the host,
so they work on one host. A worker on another host has no data volume and the store is s3://.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

RUN_DIR = re.compile(r"runs/([0-9a-f-]{36})(/.*)?")


class Refused(ValueError):
    """A run asks for a part of the store that is not its own."""


@dataclass(frozen=True)
class Volume:
    """The data volume: its name, its directory on the host (what binds name), where flow
    containers see it (the path of PIPELINE_DATA_URL) and where the worker does (to make the
    directories a run writes to)."""

    name: str
    host: str
    at: str
    here: Path
    uid: int

    @property
    def store(self) -> str:
        return f"file://{self.at}"

    def bind(self, relative: str, mode: str) -> str:
        return f"{self.host}/{relative}:{self.at}/{relative}:{mode}"

    def directory(self, relative: str) -> None:
        """Make `relative` and the directories above it, owned by the flows' user."""
        path = self.here
        for part in PurePosixPath(relative).parts:
            path = path / part
            if not path.is_dir():
                path.mkdir(exist_ok=True)
                os.chown(path, self.uid, self.uid)


def relative(volume: Volume, uri: str) -> str:
    """The path of a store URI inside the volume; refused if it leaves it or is not of it."""
    if not uri.startswith(f"{volume.store}/"):
        raise Refused(f"{uri!r} is not in the data store {volume.store}")
    rest = uri.removeprefix(f"{volume.store}/")
    if any(part in ("", ".", "..") for part in rest.split("/")) or any(c in rest for c in "\\?#%:"):
        raise Refused(f"{uri!r} is not a plain path in the data store")
    return rest


def run_of(volume: Volume, uri: str) -> str:
    """The run directory a store URI is in."""
    match = RUN_DIR.fullmatch(relative(volume, uri))
    if not match:
        raise Refused(f"{uri!r} is not in a run's directory")
    return match[1]


def for_main(volume: Volume, run_id: str, source: str | None) -> list[str]:
    own = f"runs/{run_id}"
    for directory in (own, "cache"):
        volume.directory(directory)
    binds = [volume.bind("runs", "ro"), volume.bind(own, "rw"), volume.bind("cache", "rw")]
    if source and source.startswith(f"{volume.store}/inbox/"):
        binds.append(volume.bind(relative(volume, source), "ro"))
    return binds


def for_step(volume: Volume, owner: str, out: str, inputs: list[str]) -> list[str]:
    """`out` must be in the directory of the main run `owner`; `inputs` are the files of its input,
    each already checked to belong to `owner`'s pipeline."""
    if run_of(volume, out) != owner:
        raise Refused(f"output {out!r} is not in the directory of its main run {owner}")
    volume.directory(relative(volume, out))
    return [
        volume.bind(relative(volume, out), "rw"),
        *(volume.bind(relative(volume, uri), "ro") for uri in dict.fromkeys(inputs)),
    ]


def for_maintenance(volume: Volume) -> list[str]:
    return [f"{volume.name}:{volume.at}"]
