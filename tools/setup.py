"""Apply the work pools and the blocks the flows use; the compose `setup` service runs it on `up`.

    python tools/setup.py pools/docker.json "$FLOW_POOL:$FLOW_POOL_LIMIT" ... --blocks

Each pool gets the base job template, with ${VAR} filled in from the environment (entries
that come out empty are dropped, e.g. the stack network on a remote host), and its concurrency
limit. With --blocks, it first saves the blocks that the template and prefect.yaml refer to: the
result storage, in the data store, and the registry's credentials. Idempotent: every `up`
reapplies .env.
"""

import argparse
import json
import os
import string
from pathlib import Path
from typing import Any

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect_docker.credentials import DockerRegistryCredentials

RESULTS_BLOCK = "pipeline-results"
REGISTRY_BLOCK = "pipeline-registry"
SECRETS = Path("/secrets")


def results_storage() -> LocalFileSystem | RemoteFileSystem:
    """Where Prefect persists results: `results/` in the data store, through Prefect's fsspec
    file systems (its local one for file://, its remote one for s3:// and the like)."""
    url = f"{os.environ['PIPELINE_DATA_URL'].rstrip('/')}/results"
    if url.startswith("file://"):
        return LocalFileSystem(basepath=url.removeprefix("file://"))
    return RemoteFileSystem(basepath=url)


def save_blocks() -> None:
    results_storage().save(RESULTS_BLOCK, overwrite=True)
    user = (SECRETS / "registry-htpasswd").read_text().split(":", 1)[0]
    DockerRegistryCredentials(
        username=user,
        password=(SECRETS / "registry-password").read_text().strip(),
        registry_url=os.environ["REGISTRY"],
    ).save(REGISTRY_BLOCK, overwrite=True)
    print(f"blocks: {RESULTS_BLOCK} in the data store, {REGISTRY_BLOCK} for {os.environ['REGISTRY']}")


def render(template: Any) -> Any:
    """Fill ${VAR} from the environment; drop list items and mapping entries that are empty."""
    if isinstance(template, dict):
        items = {k: render(v) for k, v in template.items()}
        return {k: v for k, v in items.items() if v != ""}
    if isinstance(template, list):
        return [item for item in map(render, template) if item != ""]
    if isinstance(template, str):
        try:
            return string.Template(template).substitute(os.environ)
        except KeyError as exc:
            raise SystemExit(f"error: the pool template needs {exc.args[0]} in the environment") from exc
    return template


def apply_pool(name: str, limit: int, template: dict[str, Any]) -> None:
    """Create the docker pool, or update its template and limit in place."""
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(name=name, type="docker", base_job_template=template, concurrency_limit=limit)
            )
        except ObjectAlreadyExists:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template, concurrency_limit=limit))
    print(f"work pool {name}: limit {limit}, template applied")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("template", type=Path, help="base job template, e.g. pools/docker.json")
    parser.add_argument("pools", nargs="+", metavar="NAME:LIMIT")
    parser.add_argument("--blocks", action="store_true", help="save the blocks first")
    args = parser.parse_args()
    with get_client(sync_client=True) as client:  # fail at once, naming the address, not deep in a call
        if failure := client.api_healthcheck():
            raise SystemExit(f"error: cannot reach the Prefect API at {client.api_url}: {failure!r}")
    if args.blocks:
        save_blocks()
    with get_client(sync_client=True) as client:  # the template refers to blocks by slug and id
        registry = client.read_block_document_by_name(REGISTRY_BLOCK, "docker-registry-credentials")
    os.environ["REGISTRY_CREDENTIALS_ID"] = str(registry.id)
    os.environ["RESULTS_STORAGE_BLOCK"] = f"{results_storage().get_block_type_slug()}/{RESULTS_BLOCK}"
    template = json.loads(args.template.read_text())
    template["job_configuration"] = render(template["job_configuration"])
    for pool in args.pools:
        name, limit = pool.rsplit(":", 1)
        apply_pool(name, int(limit), template)


if __name__ == "__main__":
    main()
