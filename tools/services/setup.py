"""Apply the work pools, the registry's block and the automations; the compose `setup` service runs
it on `up`.

    python tools/services/setup.py pools/docker.json "$FLOW_POOL:$FLOW_POOL_LIMIT" ... --blocks

Each pool (of this platform's worker type, worker/pipeline_worker/) gets the base job template,
with ${VAR} filled in from the environment (entries that come out empty are dropped, e.g. the
stack network on a remote host, or the S3 keys, which only the workers hold), and its concurrency
limit. With --blocks, it first saves the registry's credentials for `prefect deploy`'s push, and
pools/automations.json. Idempotent: every `up` reapplies .env.
"""

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pipeline_worker import PolicyDockerWorker, render
from pipeline_worker.policy import registry_login
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectAlreadyExists

REGISTRY_BLOCK = "pipeline-registry"


def save_blocks() -> None:
    """The registry's credentials, for `prefect deploy`'s push (an admin's call: no flow run reads it)."""
    credentials = registry_login(os.environ["REGISTRY"])
    if credentials is None:
        raise SystemExit("error: /secrets/registry-password is missing: the secrets job did not run")
    credentials.save(REGISTRY_BLOCK, overwrite=True)
    print(f"block: {REGISTRY_BLOCK} for {os.environ['REGISTRY']}")


def apply_automations(path: Path) -> None:
    """Create or replace each automation of the file, by name."""
    with get_client(sync_client=True) as client:
        for spec in render(json.loads(path.read_text())):
            spec["trigger"]["within"] = int(spec["trigger"]["within"])  # seconds, from .env as text
            automation = AutomationCore.model_validate(spec)
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            client.create_automation(automation)
            print(f"automation {automation.name}: applied")


def apply_pool(name: str, limit: int, template: dict[str, Any]) -> None:
    """Create the docker pool, or update its template and limit in place."""
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name, type=PolicyDockerWorker.type, base_job_template=template, concurrency_limit=limit
                )
            )
        except ObjectAlreadyExists:
            if (kind := client.read_work_pool(name).type) != PolicyDockerWorker.type:
                raise SystemExit(
                    f"error: work pool {name} is of type {kind}, not {PolicyDockerWorker.type}: delete it "
                    f"(prefect work-pool delete {name}) and start the stack again"
                ) from None
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
        apply_automations(args.template.parent / "automations.json")
    template = json.loads(args.template.read_text())
    template["job_configuration"] = render(template["job_configuration"])
    for pool in args.pools:
        name, limit = pool.rsplit(":", 1)
        apply_pool(name, int(limit), template)


if __name__ == "__main__":
    main()
