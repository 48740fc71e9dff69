"""Outgrowing one machine: a step mapped over partitions runs on workers of two Docker engines,
from the registry and the s3:// store, and the same deployments render for a Kubernetes work pool."""

import asyncio
import json
import operator
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from harness import CI, PREFECT, ROOT, S3_KEYS, SETTINGS, project_copy, wait_for
from prefect.client.schemas.objects import FlowRun

pytestmark = pytest.mark.e2e

BRIDGE = "pipeline-e2"  # the second engine's own bridge: --bridge=none would delete docker0
MAPPED = [{"step": "validate/validate", "partitions": 4}, "subflow/subflow"]


class Engine:
    """A second Docker engine on this machine: its own data, state, socket, bridge and images."""

    def __init__(self, root: Path):
        self.root, self.socket = root, root / "docker.sock"
        self.pidfile = root / "docker.pid"

    def start(self) -> None:
        mirrors = json.loads(
            subprocess.run(
                ["docker", "info", "--format", "{{json .RegistryConfig.Mirrors}}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=False, capture_output=True)
        subprocess.run(["ip", "addr", "replace", "172.31.250.1/24", "dev", BRIDGE], check=True)
        subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
        mirror = [a for m in mirrors or [] for a in ("--registry-mirror", m)]  # as the first engine's
        args = ["dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                "-H", f"unix://{self.socket}", "--pidfile", str(self.pidfile), "--bridge", BRIDGE,
                "--iptables=false", *mirror]  # fmt: skip
        self.log = (self.root / "dockerd.log").open("w")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("the second engine", lambda: self.docker("info", check=False).returncode == 0, timeout=120)

    def docker(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["docker", "-H", f"unix://{self.socket}", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=1800,
        )
        if check and proc.returncode != 0:
            output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            raise AssertionError(f"docker {' '.join(args)} on the second engine exited {proc.returncode}\n{output}")
        return proc

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        subprocess.run(["umount", str(self.root / "exec" / "netns" / "default")], check=False, capture_output=True)
        subprocess.run(["ip", "link", "delete", BRIDGE], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def engine():
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        if CI:
            pytest.fail("CI=true but a second Docker engine needs dockerd and root")
        pytest.skip("a second Docker engine needs dockerd and root")
    second = Engine(Path(tempfile.mkdtemp(prefix="engine2-")))
    second.start()
    yield second
    second.stop()


@pytest.fixture(scope="module")
def s3_stack(stack):
    """The test stack on the s3:// store: what hosts without a shared volume need."""
    store = {"AWS_ENDPOINT_URL": "http://s3:9000", **S3_KEYS}
    stack.use_store("s3://pipeline/data", **store)
    yield stack
    for name in store:
        stack.overrides.pop(name)
    stack.use_store(SETTINGS["PIPELINE_DATA_URL"])


@pytest.fixture(scope="module")
def remote_worker(s3_stack, engine, tmp_path_factory):
    """worker/compose.yml on the second engine, as the README's recipe runs it on another host."""
    secrets = tmp_path_factory.mktemp("remote-secrets")
    for name in ("api-auth-string", "flow-auth-string", "registry-password", "registry-htpasswd"):
        shutil.copy(ROOT / ".secrets" / s3_stack.project / name, secrets / name)
    env = {
        **s3_stack.env(),
        "DOCKER_HOST": f"unix://{engine.socket}",
        "DOCKER_SOCKET": str(engine.socket),
        "WORKER_SECRETS": str(secrets),
        "WORKER_NETWORK_MODE": "host",  # the server's API is on this machine's loopback
        "PREFECT_API_URL": s3_stack.api_url,
        "FLOW_API_URL": f"http://127.0.0.1:{s3_stack.prefect_port + 1}/api",
        "AWS_ENDPOINT_URL": s3_stack.s3_url,
        "COMPOSE_PROJECT_NAME": "pipeline-worker-e2e",
        "WORKER_LIMIT": "2",  # so 4 partitions cannot all go to one host
    }
    compose = ["docker", "compose", "-f", "worker/compose.yml"]
    # Built with the host's network: the second engine's bridge has no NAT to reach PyPI.
    image = f"pipeline-worker/worker:{SETTINGS['PREFECT_VERSION']}"
    engine.docker(
        "build",
        "--network",
        "host",
        "-t",
        image,
        "--build-arg",
        f"PREFECT_IMAGE={SETTINGS['PREFECT_IMAGE']}",
        str(ROOT / "worker"),
    )
    up = subprocess.run(
        [*compose, "up", "-d", "--wait"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert up.returncode == 0, up.stdout + up.stderr
    yield env
    subprocess.run([*compose, "down", "-v"], cwd=ROOT, env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def worker_here(remote_worker):
    """worker/compose.yml on this machine's engine too: the remote pool then has a worker on each
    of two hosts, as the README's fan-out recipe runs one per host."""
    env = {**remote_worker, "DOCKER_SOCKET": "/var/run/docker.sock", "COMPOSE_PROJECT_NAME": "pipeline-worker-e2e-here"}
    env.pop("DOCKER_HOST")
    compose = ["docker", "compose", "-f", "worker/compose.yml"]
    up = subprocess.run(
        [*compose, "up", "-d", "--build", "--wait"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert up.returncode == 0, up.stdout + up.stderr
    yield env
    subprocess.run([*compose, "down", "-v"], cwd=ROOT, env=env, capture_output=True, timeout=300)


def submitted(env: dict[str, str]) -> str:
    """What the worker of a worker/compose.yml project logged, e.g. `Flow run '<name>' submitted to
    infrastructure` once it started a run's container (two workers may both try to submit a run:
    the server lets one, and the other logs `Aborted submission`)."""
    logs = ["docker", "compose", "-f", "worker/compose.yml", "logs", "worker"]
    return subprocess.run(logs, cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def on_remote_pool(directory: Path, component: str) -> Path:
    """A project copy whose `component` runs on the remote pool: the one-line change of the recipe."""
    project = project_copy(directory)
    text = (project / "prefect.yaml").read_text()
    block = f"    entrypoint: {component}/{component}.py:{component}\n"
    start = text.index(block)
    end = text.index("    work_pool: *subflow_pool\n", start)
    (project / "prefect.yaml").write_text(
        text[:end] + "    work_pool: *remote_pool\n" + text[end + len("    work_pool: *subflow_pool\n") :]
    )
    return project


def test_a_step_mapped_over_workers_on_two_docker_engines_gives_the_unmapped_output(
    s3_stack, engine, remote_worker, worker_here, tmp_path
):
    stack = s3_stack
    here = stack.run("main-flow/main")  # unmapped, on this host's pools
    assert here.state.is_completed(), here.state
    image = stack.deployment("validate/validate").job_variables["image"]
    assert engine.docker("image", "inspect", image, check=False).returncode != 0  # no shared images
    stack.deploy("validate", cwd=on_remote_pool(tmp_path, "validate"))
    try:
        assert stack.deployment("validate/validate").work_pool_name == SETTINGS["REMOTE_POOL"]
        there = stack.run("main-flow/main", steps=MAPPED, part_rows=40)
    finally:
        stack.deploy("validate")
    assert there.state.is_completed(), there.state
    partitions = [run for run in stack.children(there.id) if stack.flow_name(run) == "validate"]
    assert len(partitions) == 4 and {run.work_pool_name for run in partitions} == {SETTINGS["REMOTE_POOL"]}
    # Each partition ran on one of the two hosts, and each host ran some.
    first, second = submitted(worker_here), submitted(remote_worker)
    on_first = [f"Flow run '{run.name}' submitted to infrastructure" in first for run in partitions]
    on_second = [f"Flow run '{run.name}' submitted to infrastructure" in second for run in partitions]
    assert any(on_first) and any(on_second) and all(map(operator.xor, on_first, on_second)), (on_first, on_second)
    # The second engine pulled the image from the registry to run its partitions.
    assert engine.docker("image", "inspect", image, check=False).returncode == 0
    before, after = stack.output(here), stack.output(there)
    mapped = after["results"]["validate/validate"]
    assert [p["rows"] for p in mapped["output"]["parts"]] == [40, 40, 40, 30]
    assert mapped["output"]["parts"] == after["input"]["parts"]  # validate passes its input on, part for part
    summary, unmapped = after["results"]["subflow/subflow"], before["results"]["subflow/subflow"]
    assert summary["summary"] == unmapped["summary"]
    assert summary["output"]["sha256"] == unmapped["output"]["sha256"]  # the same summary, byte for byte


def test_a_worker_that_cannot_reach_the_api_fails_fast_with_the_cause(remote_worker):
    env = {
        **remote_worker,
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
        "COMPOSE_PROJECT_NAME": "pipeline-worker-unreachable",
    }
    compose = ["docker", "compose", "-f", "worker/compose.yml"]
    try:
        up = subprocess.run(
            [*compose, "up", "-d", "--wait"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        logs = subprocess.run([*compose, "logs", "setup"], cwd=ROOT, env=env, capture_output=True, text=True).stdout
    finally:
        subprocess.run([*compose, "down", "-v"], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert up.returncode != 0 and 'service "setup" didn\'t complete successfully' in up.stderr
    assert "127.0.0.1:9" in logs and ("ConnectError" in logs or "Connection refused" in logs), logs[-3000:]


def test_the_deployments_render_for_a_kubernetes_work_pool(stack, tmp_path):
    """The documented override: a kubernetes pool with the docker template's command and env, and
    `FLOW_POOL=<it> SUBFLOW_POOL=<it> prefect deploy --all`. No cluster: the job is only rendered."""
    pool = "kubernetes-e2e"
    stack.sh(PREFECT, "work-pool", "create", pool, "--type", "kubernetes", "--overwrite")
    docker_template = json.loads((ROOT / "pools" / "docker.json").read_text())["job_configuration"]
    with stack.api() as client:
        template = client.read_work_pool(pool).base_job_template
    defaults = template["variables"]["properties"]
    defaults["command"]["default"] = docker_template["command"]
    defaults["env"]["default"] = {
        "PIPELINE_DATA_URL": "s3://pipeline/data",
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "remote-file-system/pipeline-results",
    }
    (tmp_path / "kubernetes.json").write_text(json.dumps(template))
    stack.sh(PREFECT, "work-pool", "update", pool, "--base-job-template", str(tmp_path / "kubernetes.json"))
    try:
        stack.sh(PREFECT, "--no-prompt", "deploy", "--all", timeout=1800, FLOW_POOL=pool, SUBFLOW_POOL=pool)
        with stack.api() as client:
            for name in ("main-flow/main", "validate/validate", "subflow/subflow"):
                deployment = client.read_deployment_by_name(name)
                assert deployment.work_pool_name == pool
                run = FlowRun(id=uuid.uuid4(), name="rendered", flow_id=deployment.flow_id, deployment_id=deployment.id)
                job = asyncio.run(render(stack, template, deployment, run))
                container = job["spec"]["template"]["spec"]["containers"][0]
                env = {e["name"]: e.get("value") for e in container["env"]}
                assert container["image"] == deployment.job_variables["image"]
                assert container["args"] == docker_template["command"].split()
                assert env["PIPELINE_DATA_URL"] == "s3://pipeline/data" and env["PREFECT__FLOW_RUN_ID"] == str(run.id)
    finally:
        stack.deploy()  # back on the docker pools
        stack.sh(PREFECT, "work-pool", "delete", pool)


async def render(stack, template: dict, deployment, run: FlowRun) -> dict:
    """The Kubernetes job a kubernetes worker would submit for `run`."""
    from prefect.client.orchestration import PrefectClient
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async with PrefectClient(stack.api_url, auth_string=stack.secret("api-auth-string")) as client:
        configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
            template, deployment.job_variables, client=client
        )
        configuration.prepare_for_flow_run(run, deployment=deployment)
    return configuration.job_manifest
