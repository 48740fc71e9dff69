"""List a component's versions in the registry, or roll its deployment back to one, without a build.

    python tools/versions.py list subflow           # tags in the registry, newest first; * = deployed
    python tools/versions.py rollback subflow TAG   # the next run of subflow uses image TAG

A component is a deployment name in prefect.yaml. Rollback points the registered deployment at an
image that is already in the registry (its `image` job variable and its version); the next
`prefect deploy --name COMPONENT` deploys the working tree again. Prefect's open-source server
has no rollback of its own, hence this file. Run it in the `cli` service (make versions).
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from prefect import get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect_docker.credentials import DockerRegistryCredentials

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_URL = os.environ.get("REGISTRY_URL", "http://registry:5000")  # the registry in the stack
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def image_name(component: str) -> str:
    """The image that prefect.yaml builds for a deployment: $REGISTRY/<its directory>."""
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        if deployment["name"] == component:
            step = next(s for s in deployment["build"] if "tools/deploy/image_tag.py:image_tag" in s)
            return f"{os.environ['REGISTRY']}/{step['tools/deploy/image_tag.py:image_tag']['directory']}"
    names = [d["name"] for d in config["deployments"]]
    sys.exit(f"error: no component {component!r} in prefect.yaml (components: {names})")


def registry_tags(
    repository: str, url: str = REGISTRY_URL, auth: tuple[str, str] | None = None
) -> dict[str, tuple[str, str]]:
    """Tag -> (creation time, digest) of each image of `repository` in the registry at `url`,
    newest first; logged in as `auth`, or as the stack's registry block says."""
    if auth is None:
        credentials = DockerRegistryCredentials.load("pipeline-registry")
        auth = (credentials.username, credentials.password.get_secret_value())
    with httpx.Client(base_url=f"{url}/v2/{repository}", auth=auth, timeout=10) as registry:
        response = registry.get("/tags/list")
        if response.status_code == 404:
            return {}
        response.raise_for_status()
        created = {}
        for tag in response.json().get("tags") or []:
            manifest = registry.get(f"/manifests/{tag}", headers={"Accept": MANIFEST})
            config = registry.get(f"/blobs/{manifest.json()['config']['digest']}").json()
            created[tag] = (config.get("created", ""), manifest.headers["Docker-Content-Digest"])
    return dict(sorted(created.items(), key=lambda item: item[1][0], reverse=True))


def read_deployment(client: Any, component: str) -> Any:
    """The registered deployment of a component."""
    found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[component])))
    if not found:
        sys.exit(f"error: deployment {component!r} is not registered; run prefect deploy first")
    return found[0]


def list_versions(component: str) -> None:
    """Print the registry's tags of a component, marking the deployed one."""
    name = image_name(component)
    with get_client(sync_client=True) as client:
        deployed = read_deployment(client, component).job_variables.get("image")
    for tag, (created, digest) in registry_tags(name.split("/", 1)[1]).items():
        mark = "*" if deployed in (f"{name}:{tag}", f"{name}@{digest}") else " "
        print(f"{mark} {tag}  {created[:19]}")


def rollback(component: str, tag: str) -> None:
    """Point a component's deployment at an image already in the registry, by its digest."""
    name = image_name(component)
    tags = registry_tags(name.split("/", 1)[1])
    if tag not in tags:
        sys.exit(f"error: {name}:{tag} is not in the registry (tags: {', '.join(tags) or 'none'})")
    image = f"{name}@{tags[tag][1]}"
    with get_client(sync_client=True) as client:
        deployment = read_deployment(client, component)
        variables = {**deployment.job_variables, "image": image}
        client.update_deployment(deployment.id, DeploymentUpdate(job_variables=variables, version=tag))
    print(f"{component}: deployment now runs {image}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list a component's versions").add_argument("component")
    back = commands.add_parser("rollback", help="deploy an earlier version, no build")
    back.add_argument("component")
    back.add_argument("tag")
    args = parser.parse_args()
    if args.command == "list":
        list_versions(args.component)
    else:
        rollback(args.component, args.tag)


if __name__ == "__main__":
    main()
