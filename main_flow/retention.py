"""Retention: remove the stored data and the per-run Variables of pipeline runs older than N days.

The main flow owns the store's layout (runs/<main run id>/...), so it ships this flow too; it
runs daily on a schedule (prefect.yaml) and on demand (`make retention DAYS=7`).
"""

from datetime import UTC, datetime, timedelta
from typing import Annotated
from uuid import UUID

import fsspec
from prefect import flow, get_client, get_run_logger
from prefect.client.orchestration import SyncPrefectClient
from prefect.exceptions import ObjectNotFound
from pydantic import Field
from pydantic_settings import BaseSettings

PAGE = 200  # the server's default and largest page


class Settings(BaseSettings):
    """Operator settings, from the container's environment (set by the work pool's template)."""

    pipeline_data_url: str = "file:///data"


@flow(name="retention")
def retention(days: Annotated[float, Field(ge=0)] = 30) -> dict[str, int]:
    """Delete runs/<id>/ of main runs started before now - `days`, and older subflow Variables."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    fs, root = fsspec.core.url_to_fs(f"{Settings().pipeline_data_url.rstrip('/')}/runs")
    removed = {"runs": 0, "variables": 0}
    with get_client(sync_client=True) as client:
        for path in fs.ls(root, detail=False) if fs.exists(root) else []:
            if started(client, path.rstrip("/").rsplit("/", 1)[-1]) < cutoff:
                fs.rm(path, recursive=True)
                removed["runs"] += 1
        for name in expired_variables(client, cutoff):
            client.delete_variable_by_name(name)
            removed["variables"] += 1
    get_run_logger().info("removed %(runs)d run directories and %(variables)d Variables", removed)
    return removed


def expired_variables(client: SyncPrefectClient, cutoff: datetime) -> list[str]:
    """Names of the subflows' per-run Variables created before `cutoff`, read page by page."""
    expired, offset = [], 0
    query = {"variables": {"tags": {"all_": ["subflow-output"]}}, "limit": PAGE}
    while page := client.request("POST", "/variables/filter", json={**query, "offset": offset}).json():
        expired += [v["name"] for v in page if datetime.fromisoformat(v["created"]) < cutoff]
        offset += len(page)
    return expired


def started(client: SyncPrefectClient, name: str) -> datetime:
    """When the main run a directory belongs to was created; long ago if the server forgot it."""
    try:
        return client.read_flow_run(UUID(name)).created
    except (ValueError, ObjectNotFound):
        return datetime.min.replace(tzinfo=UTC)
