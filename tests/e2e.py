"""Helpers for end-to-end tests on the real Docker stack: compose, the CLI, the API."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun

ROOT = Path(__file__).resolve().parent.parent
API_URL = "http://127.0.0.1:4200/api"
PREFECT = str(Path(sys.executable).with_name("prefect"))  # the host CLI of this environment


def dotenv() -> dict[str, str]:
    """The pins in .env, as `set -a && . ./.env` exports them for the host CLI."""
    lines = (ROOT / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def host_env() -> dict[str, str]:
    """The environment the README's host commands run in."""
    return {**os.environ, **dotenv(), "PREFECT_API_URL": API_URL}


def require_docker() -> None:
    """Skip without a Docker engine, except under CI=true, where that is a failure."""
    ok = (
        shutil.which("docker")
        and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    )
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no Docker engine is reachable: the e2e tests must run")
        pytest.skip("no Docker engine reachable")


def sh(
    *args: str, timeout: float = 900, check: bool = True, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run a command with the host environment; show its output on failure."""
    proc = subprocess.run(
        args, cwd=cwd, env=host_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def compose(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return sh("docker", "compose", *args, **kwargs)


def trigger(deployment: str, *params: str, watch: bool = True) -> FlowRun:
    """`prefect deployment run DEPLOYMENT [--watch]` with the host CLI; the (finished) run."""
    args = [a for p in params for a in ("--param", p)] + (["--watch"] if watch else [])
    proc = sh(PREFECT, "deployment", "run", deployment, *args, check=False)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout)
    assert match, f"no flow run id in the CLI output:\n{proc.stdout}\n{proc.stderr}"
    return read_run(match.group(1))


def deploy(*names: str, cwd: Path = ROOT) -> float:
    """`prefect deploy --name NAME ...` (or `--all`) with the host CLI; its wall time in seconds."""
    args = [a for n in names for a in ("--name", n)] or ["--all"]
    started = time.monotonic()
    sh(PREFECT, "--no-prompt", "deploy", *args, cwd=cwd, timeout=1800)
    return time.monotonic() - started


def project_copy(directory: Path) -> Path:
    """A copy of the project's deployable part, to change a component without touching the repo."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in (".env", "prefect.yaml"):
        shutil.copy(ROOT / name, directory / name)
    for component in ("main_flow", "subflow"):
        shutil.copytree(ROOT / component, directory / component, ignore=IGNORED)
    return directory


IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


def children(run_id: Any) -> list[FlowRun]:
    """The subflow runs that a main run started."""
    with api() as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])
            )
        )


def child_of(run_id: Any, timeout: float = 60) -> FlowRun:
    """The one subflow run that a main run started, once it exists."""
    found = wait_for(f"a child run of {run_id}", lambda: children(run_id), timeout=timeout)
    assert len(found) == 1, found
    return found[0]


def wait_final(run_id: Any, timeout: float = 300) -> FlowRun:
    """Wait for a run to reach a final state."""
    return wait_for(
        f"run {run_id} to finish",
        lambda: (run := read_run(run_id)).state.is_final() and run,
        timeout=timeout,
    )


def deployment(name: str) -> Any:
    """A registered deployment by its full name, e.g. subflow/subflow."""
    with api() as client:
        return client.read_deployment_by_name(name)


def has_pandas(image: str) -> bool:
    probe = "import importlib.util as u; print(u.find_spec('pandas') is not None)"
    return sh("docker", "run", "--rm", image, "python", "-c", probe).stdout.strip() == "True"


def containers_of(run_id: Any, running: bool = False) -> str:
    """Ids of the containers of a flow run: all of them, or only the running ones."""
    flags = "-q" if running else "-aq"
    return sh("docker", "ps", flags, "--filter", f"label=io.prefect.flow-run-id={run_id}").stdout


def api() -> SyncPrefectClient:
    """A client of the stack's server, whatever other Prefect settings the session has."""
    return SyncPrefectClient(API_URL)


def read_run(run_id: Any) -> FlowRun:
    with api() as client:
        return client.read_flow_run(run_id)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def container_starts(since: float) -> dict[str, dict[str, str]]:
    """Flow-run containers started since `since` (epoch s): flow run id -> container attributes."""
    proc = sh(
        "docker", "events", "--since", f"{since:.0f}", "--until", f"{time.time():.0f}",
        "--filter", "type=container", "--filter", "event=start",
        "--filter", "label=io.prefect.flow-run-id", "--format", "{{json .}}",
    )  # fmt: skip
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return {
        e["Actor"]["Attributes"]["io.prefect.flow-run-id"]: {
            "id": e["Actor"]["ID"],
            **e["Actor"]["Attributes"],
        }
        for e in events
    }


def read_output(name: str) -> dict[str, Any]:
    """A pipeline output file from the output volume, read through the `cli` service."""
    proc = compose("run", "--rm", "-T", "cli", "cat", f"/output/{name}.json")
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def stack():
    """A clean stack with every deployment registered, shared by all e2e tests, then removed."""
    require_docker()
    compose("down", "-v", "--remove-orphans")
    compose("up", "-d", "--build", "--wait", timeout=1200)
    compose("run", "--rm", "-T", "cli", "prefect", "deploy", "--all", timeout=1800)
    yield
    compose("down", "-v", "--remove-orphans")
