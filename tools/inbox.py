"""The store's inbox: a file of yours, uploaded once, as a pipeline source.

    python tools/inbox.py PATH          # prints the file's URI in the store; make run SOURCE=PATH uses it

Objects are named by content, <store>/inbox/<sha256>/<name>: the same bytes are uploaded once,
whatever their name, and a name always means the same bytes. The copy is atomic (stepkit's
atomic_write), so a run never reads half an upload.
"""

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stepkit import atomic_write
from stepkit.layout import inbox_root

CHUNK = 1 << 20


def upload(path: Path, inbox: str | None = None) -> tuple[str, bool]:
    """The URI of `path`'s bytes in the inbox, and whether they had to be uploaded."""
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}: SOURCE must be a file, a URL or a file in main_flow/data/")
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    directory = f"{inbox or inbox_root()}/{digest}"
    fs, root = fsspec.core.url_to_fs(directory)
    if found := [p for p in fs.find(root) if not p.endswith(".partial")]:  # the same bytes, any name
        return fs.unstrip_protocol(found[0]), False
    uri = f"{directory}/{re.sub(r'[^A-Za-z0-9._-]', '_', path.name)}"  # nothing a URL would read otherwise
    with path.open("rb") as file, atomic_write(uri) as sink:
        shutil.copyfileobj(file, sink, CHUNK)
        if sink.sha256.hexdigest() != digest:  # raised inside: the object is never committed
            raise RuntimeError(f"{path} changed while it was uploaded: upload it again")
    if isinstance(fs, LocalFileSystem) and os.geteuid() == 0 and "FLOW_UID" in os.environ:
        owner = int(os.environ["FLOW_UID"])  # the cli runs as root; the flows' user owns the volume
        for changed in (fs._parent(root), root, fsspec.core.url_to_fs(uri)[1]):
            os.chown(changed, owner, owner)
    return uri, True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/inbox.py PATH")
    print(upload(Path(sys.argv[1]))[0])
