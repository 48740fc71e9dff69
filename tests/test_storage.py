"""The data store, set by configuration alone: the same pipeline on the stack's volume and on an
S3 endpoint (moto's server, tests/compose.yml), 100,000 rows over HTTP in both, retention; and what
S3 makes possible, a step mapped over workers on two Docker engines (README, "Scaling out")."""

import gzip
import json
import operator
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from prefect.client.schemas.actions import DeploymentUpdate, VariableCreate

from tests.harness import (
    CI,
    KEEP,
    ROOT,
    S3_KEYS,
    SETTINGS,
    SOURCES_BUCKET,
    expected_summary,
    iris_like,
    project_copy,
    readme_blocks,
    run_a_file_of_yours,
    wait_for,
    write_csv,
)

pytestmark = pytest.mark.e2e

ROWS = 100_000
S3_STORE = {"AWS_ENDPOINT_URL": "http://s3:9000", **S3_KEYS}


@pytest.fixture(scope="module")
def dataset(stack, serve, tmp_path_factory):
    """100,000 random rows with the Iris columns, served over HTTP, and their expected summary."""
    table = iris_like(ROWS, seed=1)
    path = write_csv(table, tmp_path_factory.mktemp("csv") / "rows100k.csv")
    return serve("rows100k.csv", path.read_bytes()), expected_summary(table), path


def assert_summary(actual: list[dict], expected: list[dict]) -> None:
    assert [g["species"] for g in actual] == [g["species"] for g in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got["count"] == want["count"]
        assert all(abs(got[k] - want[k]) <= 1e-3 for k in want if k.startswith("mean_")), (got, want)


@pytest.fixture(scope="module")
def file_mode(stack, dataset):
    """The pipeline on 100,000 rows in the default file store: its main run and output."""
    url, _, _ = dataset
    run = stack.run("main-flow/main", source=url)
    assert run.state.is_completed(), run.state
    return run, stack.output(run)


def test_100k_rows_by_reference_in_file_mode(stack, dataset, file_mode):
    _, expected, _ = dataset
    run, output = file_mode
    assert output["input"]["uri"] == f"{SETTINGS['PIPELINE_DATA_URL']}/runs/{run.id}/input/part-00000.parquet"
    assert output["input"]["rows"] == ROWS
    subflow = output["results"]["subflow/subflow"]
    assert subflow["rows"] == ROWS and sum(g["count"] for g in subflow["summary"]) == ROWS
    assert_summary(subflow["summary"], expected)
    with stack.api() as client:  # what crossed the API: a reference, a few hundred bytes
        assert len(json.dumps(client.read_flow_run(subflow["flow_run_id"]).parameters)) < 1000


def test_retention_removes_expired_run_data_and_variables(stack):
    """What is older than DAYS, or belongs to a run the server forgot, goes; the rest stays, and
    nothing outside runs/ and cache/ is touched."""
    new = stack.run("main-flow/main")
    variable = stack.output(new)["results"]["subflow/subflow"]["variable"]
    old = stack.layout(uuid.uuid4())  # a run the server no longer knows, with 8-day-old files
    old_dir, store = old.dir.removeprefix("file://"), stack.data_url().removeprefix("file://")
    cache = f"{stack.data_url()}/cache"
    aged = (
        f"mkdir -p {old_dir}/subflow {store}/elsewhere && touch -d '8 days ago' {old_dir}/input.parquet "
        f"{store}/elsewhere/old && "
        f"""echo '{{"run": "{old.run_id}"}}' > {cache.removeprefix("file://")}/expired.json"""
    )
    stack.on_volume("data", "sh", "-c", aged, write_as=SETTINGS["FLOW_UID"])
    with stack.api() as client:
        for name, tag in (
            (f"subflow-output-{old.run_id}", "subflow-output"),
            (f"pipeline-status-{old.run_id}", "pipeline-status"),
        ):
            client.create_variable(VariableCreate(name=name, value={"output": old.step("subflow")}, tags=[tag]))
    with pytest.raises(Exception, match="0 is less than the minimum of 1"):  # days=0 would delete everything
        stack.start("retention/retention", days=0)

    (command,) = [b[0] for b in readme_blocks("## Data by reference") if b[0].startswith("make retention")]
    assert "Completed" in stack.shell(command)  # DAYS=7, as written
    assert not stack.exists(old.dir) and stack.exists(stack.layout(new.id).output)
    assert stack.exists(f"{stack.data_url()}/elsewhere/old")  # not its to delete, however old
    # The cache entries of the removed run go with it; those of the run kept stay.
    assert not stack.exists(f"{cache}/expired.json")
    kept_entries = stack.on_data_volume("grep", "-rlF", f'"run": "{new.id}"', cache.removeprefix("file://"))
    assert len(kept_entries.stdout.split()) == 3  # ingest, validate, subflow
    with stack.api() as client:
        assert client.read_variable_by_name(f"subflow-output-{old.run_id}") is None
        assert client.read_variable_by_name(f"pipeline-status-{old.run_id}") is None
        assert client.read_variable_by_name(variable) is not None
        assert client.read_variable_by_name(f"pipeline-status-{new.id}") is not None


@pytest.fixture(scope="module")
def s3_mode(stack, file_mode, request):
    """The stack switched to the S3 store by configuration, and back to file afterwards, for the
    tests after this module's (or the next session's, kept): the stack goes down after the last."""
    stack.use_store("s3://pipeline/data", **S3_STORE)
    yield
    for name in S3_STORE:
        stack.overrides.pop(name)
    items = request.session.items
    if KEEP or max(i for i, item in enumerate(items) if item.module is request.module) < len(items) - 1:
        stack.use_store(SETTINGS["PIPELINE_DATA_URL"])


def test_s3_mode_gives_the_same_output_as_file_mode(stack, dataset, file_mode, s3_mode):
    """The source, too, in S3 and gzip-compressed, in a bucket other than the store's (SOURCE_ALLOW)."""
    _, file_output = file_mode
    source = f"{SOURCES_BUCKET}/raw/rows100k.csv.gz"
    stack.s3().mkdirs(SOURCES_BUCKET, exist_ok=True)
    stack.s3().pipe(source, gzip.compress(dataset[2].read_bytes()))
    run = stack.run("main-flow/main", source=f"s3://{source}")
    assert run.state.is_completed(), run.state
    output = stack.output(run)
    prefix = f"s3://pipeline/data/runs/{run.id}"
    assert output["input"]["uri"] == f"{prefix}/input/part-00000.parquet"
    assert output["results"]["subflow/subflow"]["output"]["uri"] == f"{prefix}/subflow/summary.parquet"
    for key in ("rows", "columns", "sha256", "bytes"):  # the same Parquet, byte for byte
        assert output["input"][key] == file_output["input"][key]
    for name, result in output["results"].items():
        assert result["summary"] == file_output["results"][name]["summary"]
    objects = stack.s3().find(f"pipeline/data/runs/{run.id}")
    assert sorted(o.rsplit(f"{run.id}/", 1)[1] for o in objects) == [
        "input/part-00000.parquet", "output.json", "subflow/result.json", "subflow/summary.parquet",
        "validate/result.json",
    ]  # fmt: skip
    # Nothing shared beside the runs, the cache and the inbox: no results/ (a step's result is in its run).
    assert {path.rsplit("/", 1)[1] for path in stack.s3().ls("pipeline/data")} <= {"runs", "cache", "inbox"}
    assert not stack.exists(f"{SETTINGS['PIPELINE_DATA_URL']}/runs/{run.id}")


def test_a_file_of_yours_goes_through_the_s3_inbox(stack, s3_mode, tmp_path):
    """README's first run, as written, on the S3 store: the upload goes to the store's inbox in S3."""
    _, output, table = run_a_file_of_yours(stack, tmp_path, seed=6)
    assert output["source"].startswith("s3://pipeline/data/inbox/")
    assert output["results"]["subflow/subflow"]["summary"] == expected_summary(table)


# --- scaling out: hosts that share no volume --------------------------------------------------

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
def remote_worker(stack, s3_mode, engine, tmp_path_factory):
    """worker/compose.yml on the second engine, as the README's recipe runs it on another host."""
    secrets = tmp_path_factory.mktemp("remote-secrets")
    for name in ("api-auth-string", "flow-run-key", "cache-key", "registry-password", "registry-htpasswd"):
        shutil.copy(ROOT / ".secrets" / stack.project / name, secrets / name)
    env = {
        **stack.env(),
        "DOCKER_HOST": f"unix://{engine.socket}",
        "DOCKER_SOCKET": str(engine.socket),
        "WORKER_SECRETS": str(secrets),
        "WORKER_NETWORK_MODE": "host",  # the server's API is on this machine's loopback
        "PREFECT_API_URL": stack.api_url,
        "FLOW_API_URL": f"http://127.0.0.1:{stack.prefect_port + 1}/api",
        "AWS_ENDPOINT_URL": stack.s3_url,
        "COMPOSE_PROJECT_NAME": "pipeline-worker-e2e",
        "WORKER_LIMIT": "2",  # so 4 partitions cannot all go to one host
    }
    compose = ["docker", "compose", "-f", "worker/compose.yml"]
    # The stack's worker image (compose built it from the same recipe, worker/, with the same
    # PREFECT_IMAGE), loaded there under the recipe's name: the second engine has no cache of its
    # own and its bridge no NAT to reach PyPI, so `up --build` there finds it built.
    image = f"pipeline-worker/worker:{SETTINGS['PREFECT_VERSION']}"
    stack.sh("docker", "tag", f"{stack.project}/worker:{SETTINGS['PREFECT_VERSION']}", image)
    saved = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    loaded = subprocess.run(["docker", "-H", f"unix://{engine.socket}", "load"], stdin=saved.stdout,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert saved.wait(timeout=600) == 0 and loaded.returncode == 0, loaded.stderr
    up = subprocess.run(
        [*compose, "up", "-d", "--wait"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert up.returncode == 0, up.stdout + up.stderr
    yield env  # no `down`: the engine goes, with everything on it


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
    stack, dataset, file_mode, s3_mode, engine, remote_worker, worker_here, tmp_path
):
    """Hosts without a shared volume need S3: worker/compose.yml on this engine and on a second one
    (README, "Scaling out"), validate mapped over both, and the output of the unmapped run on one
    host (file_mode: the same rows)."""
    here = stack.deployment("validate/validate")
    image = here.job_variables["image"]
    assert engine.docker("image", "inspect", image, check=False).returncode != 0  # no shared images
    stack.deploy("validate", cwd=on_remote_pool(tmp_path, "validate"))
    try:
        assert stack.deployment("validate/validate").work_pool_name == SETTINGS["REMOTE_POOL"]
        there = stack.run("main-flow/main", source=dataset[0], steps=MAPPED, part_rows=30_000)
    finally:  # back on its pool, as a rollback goes back: nothing built
        back = {"work_pool_name": here.work_pool_name, "work_queue_name": here.work_queue_name}
        with stack.api() as client:
            client.update_deployment(here.id, DeploymentUpdate(**back, job_variables=here.job_variables))
    assert stack.deployment("validate/validate").work_pool_name == here.work_pool_name
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
    before, after = file_mode[1], stack.output(there)
    mapped = after["results"]["validate/validate"]
    assert [p["rows"] for p in mapped["output"]["parts"]] == [30_000, 30_000, 30_000, 10_000]
    assert mapped["output"]["parts"] == after["input"]["parts"]  # validate passes its input on, part for part
    summary, unmapped = after["results"]["subflow/subflow"], before["results"]["subflow/subflow"]
    assert summary["summary"] == unmapped["summary"]
    assert summary["output"]["sha256"] == unmapped["output"]["sha256"]  # the same summary, byte for byte


def test_a_worker_that_cannot_reach_the_api_fails_fast_with_the_cause(stack, remote_worker):
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
