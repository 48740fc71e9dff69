"""Where the benchmark runs: a stack (tests/harness.py), the process-worker baseline beside it and
the test data it serves.

`make bench` brings up a stack of its own (project modular-pipeline-bench), never yours. Its smoke
(tests/test_benchmark.py) borrows the e2e tests' stack instead. Either way, the baseline is up only
during the stages that run it.
"""

import contextlib
import dataclasses
import gzip
import io
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate
from prefect.workers.process import ProcessWorker

from stepkit import steps_variable
from tests.harness import ROOT, SETTINGS, Stack, iris_like, project_copy, wait_for, write_csv

BASELINE = "bench/compose.baseline.yml"
# The baseline's pools: the same components on process workers (bench/compose.baseline.yml).
POOLS = {
    "BASELINE_FLOW_POOL": "flow-process",
    "BASELINE_VALIDATE_POOL": "validate-process",
    "BASELINE_SUBFLOW_POOL": "subflow-process",
}
PROCESS_WORKERS = ("process-main_flow", "process-validate", "process-subflow")
BASELINE_CODE = "/opt/prefect/pipeline"  # where the process workers' images hold the components (component.Dockerfile)
DATA_URL = "http://testdata:8000"  # the stack's test data server (tests/compose.yml), as flows see it


@dataclasses.dataclass
class Bench:
    """A stack with the baseline beside it, and the directory its test data server serves."""

    stack: Stack
    data: Path
    designs: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"docker": "main-flow/main", "process": "main-flow/main-process"}
    )

    @classmethod
    def own(cls) -> "Bench":
        """The benchmark's own stack, beside yours: its project, ports and data."""
        data = Path(tempfile.mkdtemp(prefix="bench-data-"))
        stack = Stack(
            "modular-pipeline-bench", prefect_port=34200, registry_port=35000, s3_port=39000,
            overrides={"SOURCE_ALLOW": f"{DATA_URL}/", "TEST_DATA": str(data)},
        )  # fmt: skip
        return cls(stack, data)

    @classmethod
    def on(cls, stack: Stack) -> "Bench":
        """A stack that is up already (the e2e tests'), which serves TEST_DATA."""
        return cls(stack, Path(stack.overrides["TEST_DATA"]))

    def __post_init__(self) -> None:
        # The same project, with the baseline's services and pools added to its compose files.
        self.stack = dataclasses.replace(
            self.stack,
            extra_files=tuple(dict.fromkeys((*self.stack.extra_files, BASELINE))),
            overrides={**self.stack.overrides, **POOLS},
        )

    def up(self) -> None:
        """The whole stack, deployed (the baseline comes up only for the stages that run it)."""
        self.data.chmod(0o755)
        self.stack.down()
        self.stack.up()
        self.stack.deploy()

    @contextlib.contextmanager
    def baseline(self) -> Iterator[None]:
        """The process workers and their deployments, with the docker design's parameters and limits,
        for as long as the block runs: their polls (three workers, each every
        PREFECT_WORKER_QUERY_SECONDS) cost the server 0.18 CPU-s a second, a load on other stages."""
        with self.stack.api() as client:
            deploy_baseline(client)
        # The classic builder, whose cache `prefect deploy`'s builds (docker-py) filled: the same
        # recipe and build args, so no layer is built again (BuildKit has a cache of its own).
        # Only these three: `up --build` would rebuild the running services' images too, and
        # another builder's image ids recreate them.
        self.stack.compose("build", *PROCESS_WORKERS, timeout=1800, DOCKER_BUILDKIT="0")
        started = datetime.now(UTC)
        self.stack.compose("up", "-d", "--no-build", "--no-deps", *PROCESS_WORKERS, timeout=600)
        try:
            with self.stack.api() as client:

                def polled(pool: str) -> bool:  # since they started: not by a worker of an earlier baseline
                    workers = client.read_workers_for_work_pool(pool)
                    return any(w.last_heartbeat_time and w.last_heartbeat_time > started for w in workers)

                # A run must not wait for a worker to start: that is not what latency measures.
                wait_for("a process worker on each baseline pool", lambda: all(map(polled, POOLS.values())), 120, 0.2)
            yield
        finally:
            self.stack.compose("rm", "--stop", "--force", *PROCESS_WORKERS, timeout=300)  # pools, deployments stay

    def before(self, ref: str) -> None:
        """The main flow as of git `ref` (today's steps and pools), deployed beside today's as main-flow/before."""
        with tempfile.TemporaryDirectory() as tmp:
            project = project_copy(Path(tmp))
            archive = subprocess.run(["git", "archive", ref, "main_flow"], cwd=ROOT, capture_output=True, check=True)
            shutil.rmtree(project / "main_flow")
            with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
                tar.extractall(project, filter="data")
            config = project / "prefect.yaml"
            config.write_text(config.read_text().replace("    name: main\n", "    name: before\n", 1))
            self.stack.deploy("before", cwd=project)
        with self.stack.api() as client:  # the pipeline's steps as a parameter: "before" names no pipeline
            steps = client.read_variable_by_name(steps_variable("main")).value
            client.update_deployment(
                self.stack.deployment("main-flow/before").id, DeploymentUpdate(parameters={"steps": steps})
            )
        self.designs["before"] = "main-flow/before"

    def serve(self, rows: int, form: str = "csv") -> str:
        """`rows` random Iris-like rows (seed `rows`) on the test data server as `form` (csv, csv.gz
        or parquet, each with the CSV's own column types); their URL as the flows see it."""
        plain, path = self.data / f"rows{rows}.csv", self.data / f"rows{rows}.{form}"
        if not plain.exists():
            write_csv(iris_like(rows, seed=rows), plain)
        if not path.exists():
            if form == "csv.gz":
                path.write_bytes(gzip.compress(plain.read_bytes()))
            else:
                pq.write_table(pacsv.read_csv(plain), path)
            path.chmod(0o644)
        return f"{DATA_URL}/{path.name}"


def deploy_baseline(client: SyncPrefectClient) -> None:
    """The baseline's pools and deployments: each component's docker deployment (its flow,
    entrypoint, parameters and schema) on a process pool with the docker pool's limit, its code
    where the process workers' images hold it. Through the API: nothing to build or push."""
    template = ProcessWorker.get_default_base_job_template()
    steps = [f"{step}-process" for step in ("validate/validate", "subflow/subflow")]
    for name, pool, limit in (
        ("main-flow/main", POOLS["BASELINE_FLOW_POOL"], SETTINGS["FLOW_POOL_LIMIT"]),
        ("validate/validate", POOLS["BASELINE_VALIDATE_POOL"], SETTINGS["SUBFLOW_POOL_LIMIT"]),
        ("subflow/subflow", POOLS["BASELINE_SUBFLOW_POOL"], SETTINGS["SUBFLOW_POOL_LIMIT"]),
    ):
        pool_spec = WorkPoolCreate(name=pool, type="process", base_job_template=template, concurrency_limit=int(limit))
        client.create_work_pool(pool_spec, overwrite=True)
        source = client.read_deployment_by_name(name)
        parameters = {**source.parameters, **({"steps": steps} if name == "main-flow/main" else {})}
        client.create_deployment(
            flow_id=source.flow_id,
            name=f"{source.name}-process",
            work_pool_name=pool,
            entrypoint=source.entrypoint,
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": BASELINE_CODE}}],
            parameters=parameters,
            parameter_openapi_schema=source.parameter_openapi_schema,
            enforce_parameter_schema=source.enforce_parameter_schema,
        )
