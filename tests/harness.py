"""The one harness of the e2e tests and the benchmark: a stack of their own, its API, and waiting.

A `Stack` is a compose project with its own name, ports, network, volumes, secrets and registry,
so tests and benchmarks run beside the user's stack (project `modular-pipeline`, ports from
.env) and never stop, change or delete it.
"""

import asyncio
import functools
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import certifi
import docker
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import s3fs
from dotenv import dotenv_values
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.context import SettingsContext, get_settings_context
from prefect.exceptions import FlowRunWaitTimeout, PrefectHTTPStatusError
from prefect.flow_runs import wait_for_flow_run
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, Settings, get_current_settings

from stepkit import RunLayout
from tools.versions import registry_tags

ROOT = Path(__file__).resolve().parent.parent
SETTINGS: dict[str, str] = {k: v or "" for k, v in dotenv_values(ROOT / ".env").items()}
PREFECT = str(Path(sys.executable).with_name("prefect"))  # the host CLI of this environment
CI = os.environ.get("CI") == "true"
# PIPELINE_TEST_KEEP=1 (developers): leave the test stack up after the session and use it again in
# the next, to iterate on one test without its two-minute start.
KEEP = os.environ.get("PIPELINE_TEST_KEEP") == "1"
# Prefect's client loads certifi's CA bundle into a new SSL context each time it is made (30 ms of
# CPU here, ten times the request): the harness makes one per call, so they share this one.
TLS = ssl.create_default_context(cafile=certifi.where())
TEST_OVERLAY = ROOT / "tests" / "compose.yml"  # the S3 endpoint and the test data server
# Test credentials of the moto endpoint; a real store takes its keys from the environment.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
# A bucket of the S3 test endpoint other than the store's: sources that SOURCE_ALLOW lets flows read.
SOURCES_BUCKET = "sources"


# How long an e2e test waits for a pipeline run that normally takes seconds: a hung run fails its
# test fast, naming itself, its state and the workers' last lines, instead of eating the CI budget.
RUN_DEADLINE = 180
# A wait for a run to end follows the run's events, and reads the run at least this often: an
# event lost to a server restart costs seconds, not the deadline.
EVENT_WAIT_S = 10
DATA_DIRS: dict[str, Path | None] = {}  # project -> its data volume's directory on this machine, if readable


@functools.cache
def api_settings(api_url: str, auth_string: str) -> Settings:
    """Prefect's settings with a stack's API, for what reads them (its event subscriber): made once
    per stack, since each copy of the settings costs about a second of CPU."""
    return get_current_settings().copy_with_update(
        updates={PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth_string}
    )


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.5, diagnose: Callable[[], str] = str
) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds, naming `what`
    and adding what `diagnose` says."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{diagnose()}".rstrip())
        time.sleep(every)


SPECIES = ["setosa", "versicolor", "virginica"]
MEASURES = {
    "sepal_length": (4.3, 7.9),
    "sepal_width": (2.0, 4.4),
    "petal_length": (1.0, 6.9),
    "petal_width": (0.1, 2.5),
}


def iris_like(rows: int, seed: int = 0) -> pa.Table:
    """`rows` random rows with the Iris columns: the size tests' and the benchmark's input."""
    rng = np.random.default_rng(seed)
    columns = {name: np.round(rng.uniform(low, high, rows), 1) for name, (low, high) in MEASURES.items()}
    species = pa.DictionaryArray.from_arrays(rng.integers(0, len(SPECIES), rows, dtype=np.int32), SPECIES)
    return pa.table({**columns, "species": species})


def write_csv(table: pa.Table, path: Path) -> Path:
    pacsv.write_csv(
        table.cast(pa.schema([f.with_type(pa.string()) if f.name == "species" else f for f in table.schema])),
        path,
    )
    path.chmod(0o644)
    return path


def expected_summary(table: pa.Table) -> list[dict[str, Any]]:
    """Count and means per species, computed with numpy: independent of the flows' code."""
    group = table["species"].combine_chunks().indices.to_numpy()
    counts = np.bincount(group, minlength=len(SPECIES))
    summary = []
    for i, name in enumerate(SPECIES):
        means = {
            f"mean_{m}": round(
                float(np.bincount(group, weights=table[m].to_numpy(), minlength=len(SPECIES))[i] / counts[i]),
                3,
            )
            for m in MEASURES
        }
        summary.append({"species": name, "count": int(counts[i]), **means})
    return summary


def readme_blocks(heading: str) -> list[list[str]]:
    """The shell commands of each ```bash block under README.md's `heading` (up to the next heading
    of its level or above): continuation lines joined, comments dropped, as a user would type them."""
    text = (ROOT / "README.md").read_text()
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n")
    end = re.search(rf"\n#{{1,{len(level)}}} ", text[start + 1 :])
    section = text[start : start + 1 + end.start()] if end else text[start:]
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        blocks.append([re.sub(r"\s+#\s.*$", "", line).strip() for line in joined.splitlines() if line.strip()])
    return blocks


def run_id(watched: str) -> str:
    """The run id that `prefect deployment run` (or `make run`) printed."""
    return re.search(r"UUID: ([0-9a-f-]{36})", watched).group(1)


def fill(command: str, **values: str) -> str:
    """A README command with its <placeholders> filled in; fail on one left."""
    for name, value in values.items():
        command = command.replace(f"<{name.replace('_', ' ')}>", value)
    assert "<" not in command, f"unfilled placeholder in {command!r}"
    return command


def docker_available() -> bool:
    return bool(shutil.which("docker")) and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@functools.cache
def engine() -> docker.DockerClient:
    """This machine's Docker engine, for the calls waits repeat: a few ms each, the CLI's tens."""
    return docker.from_env()


@dataclass
class Stack:
    """A compose project of its own: the one setting `project`, and the ports it publishes."""

    project: str
    prefect_port: int
    registry_port: int
    s3_port: int | None = None  # with tests/compose.yml: an S3 endpoint and a test data server
    extra_files: tuple[str, ...] = ()  # more compose files, e.g. the benchmark's baseline
    overrides: dict[str, str] = field(default_factory=dict)

    @classmethod
    def user(cls) -> "Stack":
        """The user's own stack, as `make pipeline` runs it: only ever read, never changed."""
        return cls("modular-pipeline", int(SETTINGS["PREFECT_PORT"]), int(SETTINGS["REGISTRY_PORT"]))

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def registry(self) -> str:
        return f"localhost:{self.registry_port}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def secret(self, name: str) -> str:
        return (ROOT / ".secrets" / self.project / name).read_text().strip()

    def env(self) -> dict[str, str]:
        """The environment of compose and the host CLI for this stack."""
        env = {**os.environ, **SETTINGS}
        env.update(
            COMPOSE_PROJECT_NAME=self.project,
            PREFECT_PORT=str(self.prefect_port),
            PREFECT_FLOW_PORT=str(self.prefect_port + 1),
            REGISTRY_PORT=str(self.registry_port),
            PREFECT_API_URL=self.api_url,
            REGISTRY=self.registry,
        )
        if self.s3_port:
            env["S3_PORT"] = str(self.s3_port)
        if (ROOT / ".secrets" / self.project / "api-auth-string").is_file():
            env["PREFECT_API_AUTH_STRING"] = self.secret("api-auth-string")
        return {**env, **self.overrides}

    def sh(self, *args: str, timeout: float = 900, check: bool = True, cwd: Path = ROOT, **env: str):
        """Run a command in this stack's environment; show its output if it fails."""
        proc = subprocess.run(args, cwd=cwd, env={**self.env(), **env}, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
            )
        return proc

    def shell(self, command: str, cwd: Path = ROOT, **env: str) -> str:
        """A README command, as written, in this stack's environment (its project, ports and
        registry) with the host's .venv for make; its output. Run as typed at a prompt, not as a
        sub-make of CI's `make test` (which would add make[1]'s directory lines)."""
        top_level = [a for name in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS") for a in ("-u", name)]
        args = ("env", *top_level, "bash", "-c", command)
        return self.sh(*args, cwd=cwd, timeout=1800, VENV=str(self.venv), **env).stdout

    @property
    def venv(self) -> Path:
        """The host's virtualenv, for make in a copy of the project."""
        return Path(sys.executable).parent.parent

    def compose(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        overlays = [str(TEST_OVERLAY)] * bool(self.s3_port) + list(self.extra_files)
        files = [a for f in ["docker-compose.yml", *overlays] for a in ("-f", f)]
        return self.sh("docker", "compose", *files, *args, **kwargs)

    def up(self) -> None:
        self.compose("up", "-d", "--build", "--wait", timeout=1800)

    def down(self) -> None:
        """Remove this stack and its volumes: only ever called on a stack of our own."""
        assert self.project != Stack.user().project, "never remove the user's stack"
        self.compose("down", "-v", "--remove-orphans", timeout=600)

    def deploy(self, *names: str, cwd: Path = ROOT) -> tuple[float, str]:
        """`prefect deploy --name NAME ...` (or `--all`) with the host CLI: seconds and output."""
        args = [a for n in names for a in ("--name", n)] or ["--all"]
        started = time.monotonic()
        proc = self.sh(PREFECT, "--no-prompt", "deploy", *args, cwd=cwd, timeout=1800)
        return time.monotonic() - started, proc.stdout

    def use_store(self, url: str, **env: str) -> None:
        """Point the flows at another data store: the setup service reapplies the pool template."""
        self.overrides.update(PIPELINE_DATA_URL=url, **env)
        if url.startswith("s3://"):  # the test endpoint keeps buckets in memory: not across restarts
            self.s3().mkdirs(url.removeprefix("s3://").split("/", 1)[0], exist_ok=True)
        # The setup service (a dependency, run again by `up`) reapplies the pool template; the
        # workers are recreated, since their policy renders the store too.
        self.compose("up", "-d", "--wait", "worker-flow", "worker-subflow")

    # --- the API ------------------------------------------------------------------------------

    def api(self) -> SyncPrefectClient:
        return SyncPrefectClient(
            self.api_url, auth_string=self.secret("api-auth-string"), httpx_settings={"verify": TLS}
        )

    def deployment(self, name: str) -> Any:
        with self.api() as client:
            return client.read_deployment_by_name(name)

    def start(self, deployment: str, job_variables: dict[str, Any] | None = None, **parameters: Any) -> FlowRun:
        """Create a run of a deployment, as a scheduler, the UI or the CLI would. A main-flow run
        computes every step (refresh="all") unless told otherwise: only the cache's own tests
        and figures reuse results."""
        with self.api() as client:
            found = client.read_deployment_by_name(deployment)
            if "refresh" in found.parameter_openapi_schema.get("properties", {}):
                parameters.setdefault("refresh", "all")
            return client.create_flow_run_from_deployment(found.id, parameters=parameters, job_variables=job_variables)

    def run(self, deployment: str, timeout: float = RUN_DEADLINE, **parameters: Any) -> FlowRun:
        """Run a deployment and wait until the run is final."""
        return self.wait_final(self.start(deployment, **parameters).id, timeout)

    def read_run(self, run_id: Any) -> FlowRun:
        with self.api() as client:
            return client.read_flow_run(run_id)

    def wait_final(self, run_id: Any, timeout: float = RUN_DEADLINE) -> FlowRun:
        return wait_for(
            f"run {run_id} to finish",
            lambda: self.final_within(run_id),
            timeout=timeout,
            every=0,  # each check waits on events itself
            diagnose=lambda: self.diagnosis(run_id),
        )

    def final_within(self, run_id: Any, seconds: int = EVENT_WAIT_S) -> FlowRun | None:
        """The run, once final, if it is within `seconds`: Prefect's `wait_for_flow_run`, which follows
        the run's state events (a read every half second cost the server 12 ms of CPU each)."""
        settings = api_settings(self.api_url, self.secret("api-auth-string"))
        with SettingsContext(profile=get_settings_context().profile, settings=settings):
            try:
                return asyncio.run(wait_for_flow_run(run_id, timeout=seconds))
            except FlowRunWaitTimeout:
                return None

    def diagnosis(self, run_id: Any) -> str:
        """What a hung run looks like: its and its step runs' states and containers, the workers' last lines."""
        runs = [self.read_run(run_id), *sorted(self.children(run_id), key=lambda r: r.created)]

        def line(r: FlowRun) -> str:
            state = f"{r.state.name} {r.state.message or ''}" if r.state else "no state"
            left = self.containers(r.id)
            return f"  {r.name} ({r.id}): {state}" + (f"; containers left: {' '.join(left)}" if left else "")

        states = "\n".join(map(line, runs))
        logs = self.compose("logs", "--no-log-prefix", "--tail", "30", "worker-flow", "worker-subflow", check=False)
        return f"runs:\n{states}\nthe workers' last lines:\n{logs.stdout[-6000:]}"

    def children(self, *run_ids: Any) -> list[FlowRun]:
        """The step runs that main runs started."""
        parent = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=list(run_ids)))
        with self.api() as client:
            return client.read_flow_runs(flow_run_filter=parent)

    def child(self, run_id: Any, flow: str, timeout: float = 120) -> FlowRun:
        """The one step run of `flow` (e.g. "subflow") that a main run started, once it exists."""
        found = wait_for(
            f"a {flow} run of {run_id}",
            lambda: [c for c in self.children(run_id) if c.name and self.flow_name(c) == flow],
            timeout=timeout,
        )
        assert len(found) == 1, found
        return found[0]

    def flow_name(self, run: FlowRun) -> str:
        with self.api() as client:
            return client.read_flow(run.flow_id).name

    def running_steps(self, run_id: Any, flow: str | None = None) -> list[FlowRun]:
        """The step runs of a main run (of `flow`, if named) that are Running."""
        steps = [child for child in self.children(run_id) if child.state and child.state.is_running()]
        return [child for child in steps if flow is None or self.flow_name(child) == flow]

    def stopped(self, run_id: Any) -> bool:
        """Whether a main run and its step runs are final and none of their containers is left."""
        runs = [self.read_run(run_id), *self.children(run_id)]
        return all(r.state.is_final() for r in runs) and not any(self.containers(r.id) for r in runs)

    def wait_stopped(self, run_id: Any, timeout: float = 60, every: float = 0.5) -> None:
        """Wait until `stopped`; a timeout names each run's state and the containers left."""
        wait_for(
            f"run {run_id} and its step runs final, no container left",
            lambda: self.stopped(run_id), timeout, every, diagnose=lambda: self.diagnosis(run_id),
        )  # fmt: skip

    # --- the data store and the engine ----------------------------------------------------------

    def s3(self) -> s3fs.S3FileSystem:
        """The S3 test endpoint, from the host."""
        return s3fs.S3FileSystem(
            key=S3_KEYS["AWS_ACCESS_KEY_ID"], secret=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": self.s3_url},
        )  # fmt: skip

    def volume_dir(self, name: str, check: bool = True) -> str:
        """Where this stack's volume `name` is on the Docker host: what the workers bind from
        (empty if there is no such volume yet and check=False)."""
        found = self.sh("docker", "volume", "inspect", "-f", "{{.Mountpoint}}", f"{self.project}_{name}", check=check)
        return found.stdout.strip() if found.returncode == 0 else ""

    def on_volume(
        self, name: str, command: str, *args: str, write_as: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """`command` in a throwaway container with this stack's volume `name` at /`name`: read-only,
        or writable as the user `write_as`."""
        image = f"{self.project}/worker:{SETTINGS['PREFECT_VERSION']}"
        mount = f"{self.project}_{name}:/{name}" + ("" if write_as else ":ro")
        user = ("-u", write_as) if write_as else ()
        return self.sh("docker", "run", "--rm", *user, "-v", mount, "--entrypoint", command, image, *args, check=check)

    def on_data_volume(self, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`command` in a throwaway container with this stack's data volume at /data, read-only."""
        return self.on_volume("data", command, *args, check=check)

    def on_host(self, uri: str) -> Path | None:
        """A file-store object as a path of this machine, where the engine is local and its volumes
        are readable (root, as CI runs): reads without a throwaway container (about a second
        each under load). None elsewhere, e.g. a remote DOCKER_HOST."""
        if not (root := self._data_dir()):
            return None
        return root / uri.removeprefix("file://").removeprefix("/data").lstrip("/")

    def _data_dir(self) -> Path | None:
        if self.project not in DATA_DIRS:  # the same path for as long as the volume has its name
            if not (found := self.volume_dir("data", check=False)):  # not made yet: ask again next time
                return None
            DATA_DIRS[self.project] = Path(found) if os.access(found, os.R_OK | os.X_OK) else None
        return DATA_DIRS[self.project]

    def read_object(self, uri: str) -> bytes:
        """An object of the data store: the stack's data volume, or the S3 test endpoint."""
        if uri.startswith("s3://"):
            return self.s3().cat_file(uri)
        if path := self.on_host(uri):
            return path.read_bytes()
        return self.on_data_volume("cat", uri.removeprefix("file://")).stdout.encode()

    def exists(self, uri: str) -> bool:
        if uri.startswith("s3://"):
            return self.s3().exists(uri)
        if path := self.on_host(uri):
            return path.exists()
        return self.on_data_volume("test", "-e", uri.removeprefix("file://"), check=False).returncode == 0

    def written(self, uri: str) -> dict[str, float]:
        """The files under `uri` in the data store, with the times they were written."""
        if uri.startswith("s3://"):
            return {p: i["LastModified"].timestamp() for p, i in self.s3().find(uri, detail=True).items()}
        if path := self.on_host(uri):
            files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
            return {f"/data/{f.relative_to(self._data_dir())}": f.stat().st_mtime for f in files}
        found = self.on_data_volume("find", uri.removeprefix("file://"), "-type", "f", "-printf", "%p %T@\\n")
        return {path: float(time) for path, time in (line.rsplit(" ", 1) for line in found.stdout.splitlines())}

    def output(self, run: FlowRun) -> dict[str, Any]:
        """The pipeline output that a main run stored next to its data."""
        return json.loads(self.read_object(self.layout(run.id).output))

    def layout(self, run_id: Any) -> RunLayout:
        """Where a main run's objects are in this stack's data store."""
        return RunLayout.of(run_id, self.data_url())

    def data_url(self) -> str:
        return self.overrides.get("PIPELINE_DATA_URL", SETTINGS["PIPELINE_DATA_URL"]).rstrip("/")

    def forget_image(self, deployment: str) -> None:
        """Take a deployment's image reference (registry/name@digest) off the engine: its next run
        must pull it. Only that reference: the image, its tag and its build cache stay (while a tag
        holds it), so a later unchanged deploy still builds nothing."""
        image = self.deployment(deployment).job_variables["image"]
        self.sh("docker", "image", "rm", image)
        assert self.sh("docker", "image", "inspect", image, check=False).returncode != 0, image

    def containers(self, run_id: Any, running: bool = False) -> list[str]:
        """Ids of the containers of a flow run: all of them, or only the running ones."""
        label = f"io.prefect.flow-run-id={run_id}"
        return [c.id for c in engine().containers.list(all=not running, filters={"label": label})]

    def registry_tags(self, repository: str) -> list[str]:
        """Tags of a repository in this stack's registry, with its credentials."""
        password = self.secret("registry-password")
        user = self.secret("registry-htpasswd").split(":", 1)[0]
        return sorted(registry_tags(repository, f"http://127.0.0.1:{self.registry_port}", (user, password)))

    def snapshot(self) -> dict[str, Any]:
        """What the user would miss if a test touched it: deployments, runs, volumes, images, data."""
        with self.api() as client:
            deployments = {d.name: (str(d.id), str(d.updated), d.job_variables) for d in client.read_deployments()}
            runs = {str(r.id): r.state_type.value for r in client.read_flow_runs() if not r.auto_scheduled}
        volumes = self.sh(
            "docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}"
        )
        images = {d: self.registry_tags(d) for d in ("main_flow", "validate", "subflow", "join")}
        return {
            "deployments": deployments,
            "runs": runs,
            "volumes": sorted(volumes.stdout.split()),
            "images": images,
            "data": sorted(self.written("/data")),
        }

    def running(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def ready(self) -> bool:
        """The server answers and reaches its database (`/health` does not ask the database)."""
        with self.api() as client:
            try:
                return client.request("GET", "/ready").status_code == 200
            except (httpx.HTTPError, PrefectHTTPStatusError):
                return False


def run_a_file_of_yours(stack: "Stack", directory: Path, seed: int) -> tuple[FlowRun, dict[str, Any], pa.Table]:
    """README's first run, as written, on ./sales.csv (1,000 random rows) in a copy of the project:
    the run, its output, and the table, which the output's summary must match."""
    ((command, *_), *_) = readme_blocks("## Running the pipeline")
    assert command == "make run SOURCE=./sales.csv", command
    project = project_copy(directory)
    table = iris_like(1000, seed)
    sales = write_csv(table, project / "sales.csv").read_bytes()
    printed = stack.shell(command, cwd=project)
    inbox = f"{stack.data_url()}/inbox/{hashlib.sha256(sales).hexdigest()}/sales.csv"
    assert f"uploaded to the inbox: {inbox}" in printed
    run = stack.read_run(re.search(r"UUID: ([0-9a-f-]{36})", printed).group(1))
    assert run.state.is_completed(), run.state
    output = stack.output(run)
    assert output["source"] == inbox and stack.read_object(inbox) == sales
    assert "already in the inbox" in stack.shell(command, cwd=project)  # the same bytes: not uploaded again
    return run, output, table


def project_copy(directory: Path) -> Path:
    """A copy of the project, to change a component or follow the README without touching the
    repo. The dev lock keeps its time, so make takes the host's .venv as up to date."""
    directory.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in (".env", ".dockerignore", "prefect.yaml", "component.Dockerfile", "docker-compose.yml", "Makefile"):
        shutil.copy(ROOT / name, directory / name)
    shutil.copy2(ROOT / "requirements-dev.lock", directory / "requirements-dev.lock")
    for component in dict.fromkeys([p.parent.name for p in ROOT.glob("*/requirements.lock")] + ["tools", "stepkit"]):
        shutil.copytree(ROOT / component, directory / component, ignore=ignore)
    return directory
