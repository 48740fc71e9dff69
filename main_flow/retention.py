"""Retention: remove the stored data and the per-run Variables of pipeline runs older than N days,
and the cache entries that point into removed runs.

It walks the kit's run layout (stepkit/layout.py) and ships in the main flow's image; it runs
daily on a schedule (prefect.yaml) and on demand (`make retention DAYS=7`).
"""

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated
from uuid import UUID

import fsspec
from prefect import flow, get_client, get_run_logger
from prefect.client.orchestration import SyncPrefectClient
from prefect.exceptions import ObjectNotFound
from pydantic import Field

from stepkit.layout import cache_root, run_id_of, runs_root
from stepkit.status import PREFIX as STATUS_PREFIX
from stepkit.status import TAG as STATUS_TAG

PAGE = 200  # the server's default and largest page


# Not persisted: its counts are in its log, and a result file a day would be one more thing to clean.
@flow(name="retention", persist_result=False)
def retention(days: Annotated[float, Field(ge=1)] = 30) -> dict[str, int]:
    """Delete runs/<id>/ of final main runs created more than `days` ago (by the clock, not by
    anything a run says of itself), with their Variables, any other per-run Variable as old, and the
    cache entries of runs no longer stored. A run still in flight keeps its directory, however old.
    Nothing outside the store's runs/ and cache/ is deleted."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    fs, runs = fsspec.core.url_to_fs(runs_root())
    paths = fs.ls(runs, detail=False) if fs.exists(runs) else []
    listed = {path.rstrip("/").rsplit("/", 1)[-1]: path for path in paths}  # run id: its directory
    expired = set()
    with get_client(sync_client=True) as client:
        for run_id, path in listed.items():
            if expired_run(client, run_id, cutoff):
                fs.rm(inside(fs, path, runs), recursive=True)
                expired.add(run_id)
        variables = expired_variables(client, cutoff, expired)
        for name in variables:
            client.delete_variable_by_name(name)
    entries = orphaned_entries(fs, listed.keys() - expired)
    if entries:
        fs.rm(entries)
    removed = {"runs": len(expired), "variables": len(variables), "cache entries": len(entries)}
    get_run_logger().info(
        "removed %(runs)d run directories, %(variables)d Variables and %(cache entries)d cache entries", removed
    )
    return removed


def inside(fs: fsspec.AbstractFileSystem, path: str, root: str) -> str:
    """`path` if it is a child of `root` (what retention may delete), else ValueError."""
    parent = fs._parent(path).rstrip("/")
    if parent != root.rstrip("/") or path.rstrip("/").rsplit("/", 1)[-1] in ("", ".", ".."):
        raise ValueError(f"retention deletes only under {root}, not {path}")
    return path


def orphaned_entries(fs: fsspec.AbstractFileSystem, stored: set[str]) -> list[str]:
    """The cache entries whose run is not among the `stored` run directories (their outputs are
    gone with it), or unreadable."""
    _, entries = fsspec.core.url_to_fs(cache_root())
    orphaned = []
    for path in (inside(fs, found, entries) for found in fs.find(entries, maxdepth=1)):
        try:
            with fs.open(path, "rb") as file:
                run = json.loads(file.read()).get("run")
        except ValueError:
            run = None
        if run not in stored:
            orphaned.append(path)
    return orphaned


def expired_variables(client: SyncPrefectClient, cutoff: datetime, runs: set[str]) -> list[str]:
    """The per-run Variables (the steps' outputs, the live status) of an expired run, or created
    before `cutoff`."""
    expired = []
    for tag in ("subflow-output", STATUS_TAG):  # the server filters variables by all of some tags only
        query, offset = {"variables": {"tags": {"all_": [tag]}}, "limit": PAGE}, 0
        while page := client.request("POST", "/variables/filter", json={**query, "offset": offset}).json():
            for variable in page:
                value = variable["value"]
                output = value.get("output", "") if isinstance(value, dict) else ""
                run = variable["name"].removeprefix(STATUS_PREFIX) if tag == STATUS_TAG else run_id_of(output)
                if run in runs or datetime.fromisoformat(variable["created"]) < cutoff:
                    expired.append(variable["name"])
            offset += len(page)
    return expired


def expired_run(client: SyncPrefectClient, name: str, cutoff: datetime) -> bool:
    """Whether the main run a directory belongs to is final and was created before `cutoff`; a
    directory of a run the server forgot has expired."""
    try:
        run = client.read_flow_run(UUID(name))
    except (ValueError, ObjectNotFound):
        return True
    return run.state is not None and run.state.is_final() and run.created < cutoff
