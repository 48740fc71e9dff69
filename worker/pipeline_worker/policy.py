"""What a flow container may be: the repository's pools/docker.json as this worker renders it,
within the bounds of pools/policy.json, whatever the server's template or a run's job variables say.

A work pool's template, a run's job variables and `POST /flow_runs/` all come from the API, so
anyone holding a credential could ask for a privileged container or another image. The worker
renders its own copy of the template with its own environment and refuses, naming every
violation, a container that differs from it or exceeds the bounds.
"""

import hashlib
import hmac
import json
import os
import re
import string
from pathlib import Path
from typing import Any

from prefect_docker.credentials import DockerRegistryCredentials

from pipeline_worker.rules import roles

POOLS = Path(os.environ.get("PIPELINE_POOLS", "/project/pools"))
SECRETS = Path("/secrets")
# What prefect-docker passes to containers.create() besides the template's container_create_kwargs.
BASE_SETTINGS = {
    "image", "network", "network_mode", "command", "environment", "auto_remove", "labels",
    "extra_hosts", "name", "volumes", "mem_limit", "memswap_limit", "privileged",
}  # fmt: skip
UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
HOST_GATEWAY = {"host.docker.internal": "host-gateway"}
# The worker names every container after its run: never the name a run asks for (it would be a
# network alias on the stack's network, e.g. `gateway`).
CONTAINER_NAME = re.compile(r"flow-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")


class PolicyViolation(Exception):
    """A container configuration the repository's policy refuses."""


def registry_login(registry: str) -> DockerRegistryCredentials | None:
    """The registry's user (the htpasswd entry's name) and password, from the stack's secrets; None
    where they are not mounted (a pool without a registry login)."""
    if not (SECRETS / "registry-password").is_file():
        return None
    return DockerRegistryCredentials(
        username=(SECRETS / "registry-htpasswd").read_text().split(":", 1)[0],
        password=(SECRETS / "registry-password").read_text().strip(),
        registry_url=registry,
    )


def render(template: Any, env: dict[str, str] | None = None) -> Any:
    """Fill ${VAR} from the environment; drop list items and mapping entries that are empty."""
    env = os.environ if env is None else env
    if isinstance(template, dict):
        items = {k: render(v, env) for k, v in template.items()}
        return {k: v for k, v in items.items() if v != ""}
    if isinstance(template, list):
        return [item for item in (render(i, env) for i in template) if item != ""]
    if isinstance(template, str):
        try:
            return string.Template(template).substitute(env)
        except KeyError as exc:
            raise SystemExit(f"error: the pool template needs {exc.args[0]} in the environment") from exc
    return template


def credential(key: bytes, flow_run_id: str) -> str:
    """A flow run's own API credential, as Prefect's clients send their auth string: good for that
    run only (the gateway's authority, authority.py, checks it with the same key)."""
    return f"{flow_run_id}:{hmac.new(key, flow_run_id.encode(), hashlib.sha256).hexdigest()}"


def memory_bytes(value: Any) -> int:
    """Docker's memory notation (512m, 1g, or bytes) in bytes; 0 for anything else."""
    match = re.fullmatch(r"([0-9]+)([bkmg]?)", str(value).lower())
    return int(match[1]) * UNITS[match[2] or "b"] if match else 0


class Policy:
    """What a flow container may be: pools/docker.json as this host renders it, plus bounds."""

    def __init__(self, pools: Path = POOLS, env: dict[str, str] | None = None):
        env = dict(os.environ if env is None else env)
        self.expected = render(json.loads((pools / "docker.json").read_text())["job_configuration"], env)
        bounds = json.loads((pools / "policy.json").read_text())
        self.max_mem_limit = bounds["max_mem_limit"]
        self.max_memory = memory_bytes(self.max_mem_limit)
        self.max_cpus, self.max_pids = int(bounds["max_nano_cpus"]), int(bounds["max_pids_limit"])
        self.roles = roles(env["FLOW_ROLES"])
        self.registry = env["REGISTRY"]
        self.api_url = env["FLOW_API_URL"]
        self.key = (env.get("FLOW_RUN_KEY") or (SECRETS / "flow-run-key").read_text()).strip().encode()
        # A worker that reaches the API on its host's loopback (one-machine setups, the tests)
        # has to give flow containers the host network too; nowhere else.
        self.host_network = env.get("FLOW_HOST_NETWORK") == "host"

    def environment(self, given: dict[str, str], flow_run_id: str, worker_keys: set[str]) -> dict[str, str]:
        """The container's environment: the pool's keys with the pool's values, the run's id and
        its own credential. A key the pool does not list refuses the run."""
        pool = {k: given.get(k, v) if "{{" in v else v for k, v in self.expected.get("env", {}).items()}
        expected = {
            **pool,
            "PREFECT_API_URL": self.api_url,
            "PREFECT_API_AUTH_STRING": credential(self.key, flow_run_id),
            "PREFECT__FLOW_RUN_ID": flow_run_id,
        }
        allowed = {*expected, *worker_keys}
        foreign = sorted(k for k in given if k not in allowed and not k.startswith("PREFECT__"))
        if foreign:
            raise PolicyViolation(f"environment variables not in the pool's list: {', '.join(foreign)}")
        return expected

    def registry_credentials(self) -> DockerRegistryCredentials | None:
        """The registry's user and password from the stack's secrets, read for each run."""
        return registry_login(self.registry)

    def check(self, settings: dict[str, Any], networks: list[str], volumes: list[str]) -> None:
        """Refuse container settings outside the policy, naming every violation; `networks` are
        all the networks the container joins (prefect-docker connects those after the first
        once the container exists), `volumes` the binds the worker chose for the run (mounts.py)."""
        get, expected = settings.get, self.expected
        kwargs = expected.get("container_create_kwargs", {})
        fixed = {key: value for key, value in kwargs.items() if not str(value).startswith("{{")}
        extra = sorted(set(settings) - BASE_SETTINGS - set(kwargs))
        image = str(get("image"))
        modes = (None, "host") if self.host_network else (None,)
        memory = memory_bytes(get("mem_limit"))
        problems = {
            f"settings outside the template: {', '.join(extra)}": bool(extra),
            f"image {image!r} is not from the registry {self.registry}": not image.startswith(f"{self.registry}/"),
            # What a run's results name as its image is what ran: a digest cannot move, a tag can.
            f"image {image!r} is not pinned by digest": "@sha256:" not in image,
            f"name {get('name')!r} is not the worker's own": not CONTAINER_NAME.fullmatch(str(get("name"))),
            "privileged": get("privileged") is not False,
            f"network mode {get('network_mode')!r}": get("network_mode") not in modes,
            f"networks {networks!r}": list(networks) != expected.get("networks", []),
            f"volumes {get('volumes')!r}": list(get("volumes") or []) != volumes,
            f"command {get('command')!r}": get("command") != expected.get("command"),
            # prefect-docker maps host.docker.internal for an API on loopback: the host, nothing more.
            f"extra hosts {get('extra_hosts')!r}": get("extra_hosts") not in (None, {}, HOST_GATEWAY),
            # The worker removes each container itself, once it has read how it ended.
            f"auto_remove {get('auto_remove')!r}": get("auto_remove") is not expected.get("auto_remove"),
            f"mem_limit {get('mem_limit')!r} outside 1..{self.max_memory} bytes": not 0 < memory <= self.max_memory,
            "memswap_limit differs from mem_limit": get("memswap_limit") != get("mem_limit"),
            f"nano_cpus {get('nano_cpus')!r} outside 1..{self.max_cpus}": not 0
            < int(get("nano_cpus") or 0)
            <= self.max_cpus,
            f"pids_limit {get('pids_limit')!r} outside 1..{self.max_pids}": not 0
            < int(get("pids_limit") or 0)
            <= self.max_pids,
        }
        problems.update({f"{key} {get(key)!r}, not {value!r}": get(key) != value for key, value in fixed.items()})
        if refused := [message for message, violated in problems.items() if violated]:
            raise PolicyViolation(f"refused by pools/policy.json: {'; '.join(refused)}")
