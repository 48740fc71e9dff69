"""The platform's worker type, `pipeline-docker`: prefect-docker's Docker worker that creates only
the containers the repository's policy allows (policy.py), names them itself, and sees each one to
its end: it waits for the container, reads how it ended (exits.py), reports a crash with its
reason, and removes it.

prefect-docker's own way, `auto_remove` and a log stream, loses the exit code when the engine
removes a container before the worker asks for it (then a run killed for memory reads as exit 0
and is never reported), and copies every line a container prints into the worker's log.
"""

import os
import time
from typing import Any
from uuid import UUID

import anyio
import docker.errors
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import Abort, ObjectNotFound
from prefect.states import Crashed, Failed
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect.utilities.engine import propose_state
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration, DockerWorkerResult

from pipeline_worker.exits import TAIL_LINES, Exit, tail_of
from pipeline_worker.policy import Policy

RUN_LABEL = "io.prefect.flow-run-id"
POOL_LABEL = "io.prefect.work-pool-name"
STACK_LABEL = "io.modular-pipeline.stack"  # which stack's worker made it: several stacks share an engine
SWEEP_S = 5.0  # how often the worker looks for containers no one is waiting for
SECRET_ENV = ("PREFECT_API_AUTH_STRING", "PREFECT_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def container_name(flow_run_id: UUID | str) -> str:
    return f"flow-{flow_run_id}"


class PolicyDockerWorker(DockerWorker):
    """A Docker worker that creates only the containers the repository's policy allows."""

    type = "pipeline-docker"
    job_configuration = DockerWorkerJobConfiguration
    _description = "Docker worker that enforces this repository's container policy (pools/policy.json)."

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.policy = Policy()
        self.stack = os.environ.get("STACK", "")
        self._exits: dict[UUID, Exit] = {}  # non-zero exits, until their crash is reported
        self._waiting: set[UUID] = set()  # runs whose container this worker is seeing to its end
        self._next_sweep = 0.0

    async def run(
        self,
        flow_run: FlowRun,
        configuration: DockerWorkerJobConfiguration,
        task_status: anyio.abc.TaskStatus | None = None,
    ) -> DockerWorkerResult:
        self._waiting.add(flow_run.id)  # before the container exists: no sweep adopts it
        try:
            return await self._run(flow_run, configuration, task_status)
        finally:
            self._waiting.discard(flow_run.id)

    async def _run(
        self, flow_run: FlowRun, configuration: DockerWorkerJobConfiguration, task_status: Any
    ) -> DockerWorkerResult:
        worker_keys = set(configuration._base_environment())
        configuration.env = self.policy.environment(configuration.env, str(flow_run.id), worker_keys)
        configuration.registry_credentials = self.policy.registry_credentials()
        configuration.name = container_name(flow_run.id)
        configuration.labels = {**configuration.labels, STACK_LABEL: self.stack}
        configuration.stream_output = False  # the tail is read at the end (exits.py), not streamed
        container, _ = await run_sync_in_worker_thread(self._create_and_start_container, configuration)
        pid = self._get_infrastructure_pid(container.id)
        if task_status is not None:
            task_status.started(pid)
        secrets = [v for k, v in configuration.env.items() if k in SECRET_ENV and v]
        ended = await self._see_to_its_end(container.id, flow_run.id, configuration.mem_limit, secrets)
        return DockerWorkerResult(status_code=ended.code if ended else -1, identifier=pid)

    def _build_container_settings(self, docker_client, configuration):  # noqa: ANN001, ANN202
        settings = super()._build_container_settings(docker_client, configuration)
        self.policy.check(settings, configuration.networks)
        return settings

    async def _see_to_its_end(
        self, container_id: str, flow_run_id: UUID, mem_limit: str | None, secrets: list[str]
    ) -> Exit | None:
        """Wait for the container to exit, keep how it ended if it failed, and remove it."""
        found = await run_sync_in_worker_thread(self._wait_and_remove, container_id)
        if found is None:
            return None
        code, oom_killed, output = found
        if code == 0:
            return Exit(0, False, "", True)
        try:
            started = (await self.client.read_flow_run(flow_run_id)).start_time is not None
        except ObjectNotFound:
            started = False
        ended = Exit(code, oom_killed, tail_of(output, secrets), started, mem_limit, self.policy.max_mem_limit)
        self._exits[flow_run_id] = ended
        return ended

    def _wait_and_remove(self, container_id: str) -> tuple[int, bool, bytes] | None:
        """The container's exit code, whether it was killed for memory, and its last lines;
        None if it is gone already (another worker of this stack saw it end)."""
        client = self._get_client()
        try:
            container = client.containers.get(container_id)
            code = container.wait()["StatusCode"]
            container.reload()
            oom_killed = bool(container.attrs["State"].get("OOMKilled"))
            output = container.logs(tail=TAIL_LINES)
            container.remove(v=True, force=True)  # and its anonymous volumes
            return code, oom_killed, output
        except docker.errors.NotFound:
            return None
        finally:
            client.close()

    async def _propose_crashed_state(self, flow_run: FlowRun, message: str, client: Any = None) -> None:
        """Report a non-zero exit with its reason; a component that could not even be loaded as
        Failed, which the main flow does not retry."""
        ended = self._exits.pop(flow_run.id, None)
        if ended is None:
            return await super()._propose_crashed_state(flow_run, message, client)
        logger = self.get_flow_run_logger(flow_run)
        logger.error("The flow run's container exited with code %d; its last lines:\n%s", ended.code, ended.tail)
        state = Failed(message=ended.message()) if ended.own_failure else Crashed(message=ended.message())
        try:
            await propose_state(client or self.client, state, flow_run_id=flow_run.id)
        except (Abort, ObjectNotFound):
            pass  # already final, or deleted
        except Exception:
            logger.exception("Failed to report the end of flow run %s", flow_run.id)

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        if time.monotonic() >= self._next_sweep and self._runs_task_group is not None:
            self._next_sweep = time.monotonic() + SWEEP_S
            self._runs_task_group.start_soon(self._sweep)
        return await super().get_and_submit_flow_runs()

    async def _sweep(self) -> None:
        """See to the end the containers of this stack's pool that no worker is waiting for: those
        a stopped or restarted worker left behind."""
        labels = [f"{STACK_LABEL}={self.stack}", f"{POOL_LABEL}={self.work_pool.name}"]
        found = await run_sync_in_worker_thread(self._containers, labels)
        for container_id, run_id in found:
            if UUID(run_id) not in self._waiting:
                self._waiting.add(UUID(run_id))
                self._runs_task_group.start_soon(self._adopt, container_id, UUID(run_id))

    def _containers(self, labels: list[str]) -> list[tuple[str, str]]:
        client = self._get_client()
        try:
            containers = client.containers.list(all=True, filters={"label": labels})
            return [(c.id, c.labels[RUN_LABEL]) for c in containers if RUN_LABEL in c.labels]
        finally:
            client.close()

    async def _adopt(self, container_id: str, flow_run_id: UUID) -> None:
        """Wait for a container this worker did not start, and report its run's crash if its
        container failed and the run has no final state."""
        try:
            ended = await self._see_to_its_end(container_id, flow_run_id, None, [])
        finally:
            self._waiting.discard(flow_run_id)
        if ended is None or ended.code == 0:
            return
        try:
            run = await self.client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            self._exits.pop(flow_run_id, None)
            return
        if run.state is not None and run.state.is_final():
            self._exits.pop(flow_run_id, None)
            return
        await self._propose_crashed_state(run, ended.message())
