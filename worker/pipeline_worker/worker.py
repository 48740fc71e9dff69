"""The platform's worker type, `pipeline-docker`: prefect-docker's Docker worker that starts only the
containers the repository's policy allows (policy.py), each with its own run's credential and its
run's part of the store (mounts.py), and sees each to its end: it waits for it, reads how it ended
(exits.py), reports a crash with its reason, and removes it.

It also operates the runs it started, which Prefect leaves to the run's own engine: a run set to
Cancelling has its container stopped and ends Cancelled (a main flow's step runs with it); a step
run whose main run ended otherwise than Completed is cancelled; a container whose run is over, or
unknown to the server, is stopped.

prefect-docker's own way, `auto_remove` and a log stream, loses the exit code when the engine
removes a container before the worker asks for it (then a run killed for memory reads as exit 0
and is never reported), and copies every line a container prints into the worker's log.
"""

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import docker
import docker.errors
from prefect._internal.observers import FlowRunCancellingObserver
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import TERMINAL_STATES, FlowRun, StateType
from prefect.events import Event
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
from prefect.exceptions import Abort, ObjectNotFound
from prefect.states import Cancelled, Cancelling, Crashed, Failed
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect.utilities.engine import propose_state
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration, DockerWorkerResult

from pipeline_worker import mounts
from pipeline_worker.exits import TAIL_LINES, Exit, tail_of
from pipeline_worker.policy import SECRETS, Policy, PolicyViolation

RUN_LABEL = "io.prefect.flow-run-id"
POOL_LABEL = "io.prefect.work-pool-name"
STACK_LABEL = "io.modular-pipeline.stack"  # which stack's worker made it: several stacks share an engine
SWEEP_S = 3.0  # how often the worker looks over its containers, and polls with no event to wake it
# The states that give a pool's worker work: a run to start, or a slot freed by a run's end.
WAKING = {state.value for state in (StateType.SCHEDULED, *TERMINAL_STATES)}
FINAL_GRACE_S = 10  # a container whose run is final this long is stopped by the sweep
SECRET_ENV = ("PREFECT_API_AUTH_STRING", "PIPELINE_CACHE_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MAIN, STEP, MAINTENANCE = "main", "step", "maintenance"


def container_name(flow_run_id: UUID | str) -> str:
    return f"flow-{flow_run_id}"


@dataclass(frozen=True)
class Role:
    """What a run is to the platform: its role (pools/policy.json) and, for a step, its main run."""

    role: str
    main: FlowRun | None = None  # a step's main run (None when run by hand), or the main run itself


class PolicyDockerWorker(DockerWorker):
    """A Docker worker that creates only the containers the repository's policy allows."""

    type = "pipeline-docker"
    job_configuration = DockerWorkerJobConfiguration
    _description = "Docker worker that enforces this repository's container policy (pools/policy.json)."

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.policy = Policy()
        self.stack = os.environ.get("STACK", "")
        self.volume = data_volume()
        self._exits: dict[UUID, Exit] = {}  # non-zero exits, until their crash is reported
        self._waiting: set[UUID] = set()  # runs whose container this worker is seeing to its end
        self._cancelled: set[UUID] = set()  # runs this worker stopped: their exit is no crash
        self._flows: dict[UUID, str] = {}  # flow id: name
        self._next_sweep = 0.0
        self._watch: FlowRunCancellingObserver | None = None
        self._wake = anyio.Event()  # set by an event of this pool's runs: poll now

    async def setup(self) -> None:
        await super().setup()
        # Cancelling events of the runs this worker started (a websocket, polling while it is away).
        self._watch = await self._exit_stack.enter_async_context(
            FlowRunCancellingObserver(on_cancelling=self._on_cancelling, polling_interval=SWEEP_S)
        )
        self._wake.set()  # the first poll at once
        await self._exit_stack.enter_async_context(self._woken_by_events())

    # --- polling when there is something to find ---------------------------------------------

    @contextlib.asynccontextmanager
    async def _woken_by_events(self) -> Any:
        async with anyio.create_task_group() as group:
            group.start_soon(self._listen)
            try:
                yield
            finally:
                group.cancel_scope.cancel()

    async def _listen(self) -> None:
        """Wake the poll when the server's event stream says a run of this pool was scheduled or
        ended; while the stream is away (the server restarting), the polls every SWEEP_S go on."""
        while True:
            states = EventFilter(
                event=EventNameFilter(prefix=["prefect.flow-run."]),
                occurred=EventOccurredFilter(since=datetime.now(UTC)),  # no backfill of old events
            )
            try:
                async with get_events_subscriber(filter=states) as events:
                    async for event in events:
                        if wakes(event, self._work_pool_name):
                            self._wake.set()
            except Exception:
                self._logger.debug("The event stream is away; polling every %ss", SWEEP_S, exc_info=True)
            await anyio.sleep(SWEEP_S)

    def _on_cancelling(self, flow_run_id: UUID) -> None:
        if self._runs_task_group is not None:
            self._runs_task_group.start_soon(self._guarded, self._cancel, flow_run_id, None)

    # --- a run, from its container's start to its end ----------------------------------------

    async def run(
        self,
        flow_run: FlowRun,
        configuration: DockerWorkerJobConfiguration,
        task_status: anyio.abc.TaskStatus | None = None,
    ) -> DockerWorkerResult:
        self._waiting.add(flow_run.id)  # before the container exists: no sweep adopts it
        if self._watch is not None:
            self._watch.add_in_flight_flow_run_id(flow_run.id)
        try:
            return await self._run(flow_run, configuration, task_status)
        finally:
            self._waiting.discard(flow_run.id)
            if self._watch is not None:
                self._watch.remove_in_flight_flow_run_id(flow_run.id)

    async def _run(
        self, flow_run: FlowRun, configuration: DockerWorkerJobConfiguration, task_status: Any
    ) -> DockerWorkerResult:
        role = await self._role(flow_run)
        if await self._over_before_its_start(flow_run, role):
            if task_status is not None:
                task_status.started("")  # nothing to report as started: the slot is released
            return DockerWorkerResult(status_code=0, identifier="")
        worker_keys = set(configuration._base_environment())
        configuration.env = self.policy.environment(configuration.env, str(flow_run.id), worker_keys)
        # What the run's results and the UI name as its image: the one this worker runs, by digest.
        configuration.env["COMPONENT_IMAGE"] = str(configuration.image)
        if role.role == MAIN:  # the cache's signing key: main flows only, never a step (README, Security)
            configuration.env["PIPELINE_CACHE_KEY"] = (SECRETS / "cache-key").read_text().strip()
        configuration.registry_credentials = self.policy.registry_credentials()
        configuration.name = container_name(flow_run.id)
        configuration.labels = {**configuration.labels, STACK_LABEL: self.stack}
        configuration.volumes = await self._mounts(flow_run, role)
        configuration.stream_output = False  # the tail is read at the end (exits.py), not streamed
        await self.client.update_flow_run(flow_run.id, tags=[*flow_run.tags, f"image:{configuration.image}"])
        container, _ = await run_sync_in_worker_thread(self._create_and_start_container, configuration)
        pid = self._get_infrastructure_pid(container.id)
        if task_status is not None:
            task_status.started(pid)
        secrets = [v for k, v in configuration.env.items() if k in SECRET_ENV and v]
        ended_with = await self._see_to_its_end(container.id, flow_run.id, configuration.mem_limit, secrets)
        if role.role == MAIN:
            await self._after_main(flow_run.id, ended_with)
        return DockerWorkerResult(status_code=ended_with.code if ended_with else -1, identifier=pid)

    async def _over_before_its_start(self, flow_run: FlowRun, role: Role) -> bool:
        """Whether a run is over before its container starts, ending it if it is not yet: cancelled
        (read again now that the cancelling observer has it, so a cancel asked before then is seen
        here), or a step whose main run ended otherwise than Completed."""
        state = (await self.client.read_flow_run(flow_run.id)).state
        if state is not None and state.is_cancelling():
            await self._cancel(flow_run.id, None)
        elif role.role == STEP and ended_otherwise(role.main) and not (state and state.is_final()):
            await self._set_cancelled(flow_run, f"Not started: its pipeline's main run {ended(role.main)}.")
        else:
            return state is not None and state.is_final()
        return True

    def _build_container_settings(self, docker_client, configuration):  # noqa: ANN001, ANN202
        settings = super()._build_container_settings(docker_client, configuration)
        self.policy.check(settings, configuration.networks, configuration.volumes)
        return settings

    async def _role(self, flow_run: FlowRun) -> Role:
        if flow_run.flow_id not in self._flows:
            self._flows[flow_run.flow_id] = (await self.client.read_flow(flow_run.flow_id)).name
        role = self.policy.roles.get(self._flows[flow_run.flow_id], STEP)
        if role == MAIN:
            return Role(MAIN, flow_run)
        if role == STEP and flow_run.parent_task_run_id:
            parent = await self.client.read_task_run(flow_run.parent_task_run_id)
            return Role(STEP, await self.client.read_flow_run(parent.flow_run_id) if parent.flow_run_id else None)
        return Role(role)

    async def _mounts(self, flow_run: FlowRun, role: Role) -> list[str]:
        """The run's part of the store (mounts.py), if this host's store is its data volume."""
        if self.volume is None:
            return []
        parameters = flow_run.parameters
        try:
            if role.role == MAINTENANCE:
                return mounts.for_maintenance(self.volume)
            if role.role == MAIN:
                source = parameters.get("source")
                if resumed := parameters.get("resume_from"):  # a resumed run reads its past run's source
                    source = (await self.client.read_flow_run(resumed)).parameters.get("source", source)
                return await run_sync_in_worker_thread(mounts.for_main, self.volume, str(flow_run.id), source)
            if "out" not in parameters:
                return []  # a flow that is not a step of the kit: nothing of the store
            # Its inputs: `data`, or a step's named ones (stepkit's DataRef: a uri and its sha256).
            refs = [
                v for k, v in parameters.items() if k != "out" and isinstance(v, dict) and {"uri", "sha256"} <= v.keys()
            ]
            inputs = [part["uri"] for ref in refs for part in ref.get("parts") or [ref]]
            if not inputs:
                raise KeyError("a step with no input")
            owner = str(role.main.id) if role.main else mounts.run_of(self.volume, inputs[0])
            for run_id in {mounts.run_of(self.volume, uri) for uri in inputs} - {owner}:
                await self._same_pipeline(run_id, owner)
            return await run_sync_in_worker_thread(mounts.for_step, self.volume, owner, parameters["out"], inputs)
        except (mounts.Refused, KeyError, TypeError) as exc:
            raise PolicyViolation(f"refused by pools/policy.json: the run's data: {exc}") from exc

    async def _same_pipeline(self, run_id: str, owner: str) -> None:
        """A step may read an earlier run's data (a cache hit) only if that run is of its own pipeline."""
        try:
            theirs, ours = await self.client.read_flow_run(run_id), await self.client.read_flow_run(owner)
        except ObjectNotFound:
            raise mounts.Refused(f"input of run {run_id}, which the server does not know") from None
        if theirs.deployment_id is None or theirs.deployment_id != ours.deployment_id:
            raise mounts.Refused(f"input of run {run_id}, which is not of this run's pipeline")

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
        ended_with = Exit(code, oom_killed, tail_of(output, secrets), started, mem_limit, self.policy.max_mem_limit)
        self._exits[flow_run_id] = ended_with
        return ended_with

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
        Failed, which the main flow does not retry. A run this worker stopped is no crash."""
        ended_with = self._exits.pop(flow_run.id, None)
        if flow_run.id in self._cancelled:
            return
        if ended_with is None:
            return await super()._propose_crashed_state(flow_run, message, client)
        logger = self.get_flow_run_logger(flow_run)
        logger.error(
            "The flow run's container exited with code %d; its last lines:\n%s", ended_with.code, ended_with.tail
        )
        state = (
            Failed(message=ended_with.message()) if ended_with.own_failure else Crashed(message=ended_with.message())
        )
        try:
            await propose_state(client or self.client, state, flow_run_id=flow_run.id)
        except (Abort, ObjectNotFound):
            pass  # already final, or deleted
        except Exception:
            logger.exception("Failed to report the end of flow run %s", flow_run.id)

    async def _after_main(self, flow_run_id: UUID, ended_with: Exit | None) -> None:
        """A main run that did not complete leaves no step behind: cancel its step runs."""
        try:
            run = await self.client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return
        if ended_with is not None and ended_with.code != 0 and flow_run_id not in self._cancelled:
            run_ended = f"main run {run.name!r} ended Crashed"  # reported right after this
        elif run.state is not None and run.state.is_final() and not run.state.is_completed():
            run_ended = f"main run {run.name!r} ended {run.state.name}"
        else:
            return
        await self._cancel_children(flow_run_id, f"Cancelled: its pipeline's {run_ended}.")

    # --- cancelling ------------------------------------------------------------------------------

    async def _cancel(self, flow_run_id: UUID, because: str | None) -> None:
        """Stop a run's container and end it Cancelled, and a main run's step runs with it."""
        try:
            run = await self.client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return
        if run.state is not None and run.state.is_final():
            return
        self._cancelled.add(flow_run_id)
        await run_sync_in_worker_thread(self._stop, str(flow_run_id))  # first: a main run starts no more steps
        steps = []
        if (await self._role(run)).role == MAIN:
            steps = await self._cancel_children(flow_run_id, f"Cancelled with its pipeline's main run {run.name!r}.")
        asked = run.state.message if run.state is not None and run.state.is_cancelling() else None
        message = because or asked or "Cancelled: its container was stopped"  # e.g. its main run's reaper's
        if steps:
            message += f"; step runs cancelled: {', '.join(steps)}"
        await self._set_cancelled(run, message)

    async def _cancel_children(self, flow_run_id: UUID, message: str) -> list[str]:
        """Cancel a main run's unfinished step runs: those not started at once, the others through
        their workers (Cancelling), which stop their containers. Their names, with their flows'."""
        parent = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        cancelled = []
        for child in await self.client.read_flow_runs(flow_run_filter=parent):
            if child.state is None or child.state.is_final():
                continue
            started = child.state.is_running() or child.state.is_pending() or child.state.is_cancelling()
            state = Cancelling(message=message) if started else Cancelled(message=message)
            await self.client.set_flow_run_state(child.id, state, force=True)
            if child.flow_id not in self._flows:
                self._flows[child.flow_id] = (await self.client.read_flow(child.flow_id)).name
            cancelled.append(f"{self._flows[child.flow_id]} (run {child.name!r})")
        return cancelled

    async def _set_cancelled(self, flow_run: FlowRun, message: str) -> None:
        self._cancelled.add(flow_run.id)
        with contextlib.suppress(ObjectNotFound):
            await self.client.set_flow_run_state(flow_run.id, Cancelled(message=message), force=True)

    def _stop(self, flow_run_id: str) -> None:
        """Kill the containers of this stack that belong to a run. Not SIGTERM: Prefect's engine
        answers it by reporting its run Crashed, over the Cancelled this worker sets."""
        labels = [f"{STACK_LABEL}={self.stack}", f"{RUN_LABEL}={flow_run_id}"]
        client = self._get_client()
        try:
            for container in client.containers.list(filters={"label": labels}):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):  # gone meanwhile
                    container.kill()
        finally:
            client.close()

    async def kill_infrastructure(self, infrastructure_pid: str, configuration: Any, grace_seconds: int = 30) -> None:
        """Stop a run's container: only one labelled with that run's id, whatever the pid says."""
        _, container_id = self._parse_infrastructure_pid(infrastructure_pid)
        labels = configuration.labels or {}
        client = self._get_client()
        try:
            container = client.containers.get(container_id)
        except docker.errors.NotFound:
            return
        finally:
            client.close()
        if not labels.get(RUN_LABEL) or container.labels.get(RUN_LABEL) != labels.get(RUN_LABEL):
            self._logger.warning("Not stopping container %s: it is not the run's own", container_id)
            return
        await run_sync_in_worker_thread(self._stop, labels[RUN_LABEL])

    # --- the sweep: containers no one waits for, runs that are over ------------------------------

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        # Prefect's loop calls this every PREFECT_WORKER_QUERY_SECONDS; each poll costs the server
        # about 35 ms of CPU, so an idle worker polls only every SWEEP_S, or when an event wakes it.
        with anyio.move_on_after(SWEEP_S):
            await self._wake.wait()
        self._wake = anyio.Event()
        if time.monotonic() >= self._next_sweep and self._runs_task_group is not None:
            self._next_sweep = time.monotonic() + SWEEP_S
            self._runs_task_group.start_soon(self._guarded, self._sweep)
        return await super().get_and_submit_flow_runs()

    async def _guarded(self, job: Any, *args: Any) -> None:
        """A background job of the worker: its failure (the server away, say) is logged, and tried
        again by the next sweep, instead of ending the worker's task group."""
        try:
            await job(*args)
        except Exception:
            self._logger.warning("%s failed; the next sweep tries again", job.__name__, exc_info=True)

    async def _sweep(self) -> None:
        """End the runs of this pool left Cancelling (their event missed, or their cancel failed),
        then look over this stack's containers of this pool: see to the end those no worker waits
        for (a stopped or restarted worker left them), stop those whose run is over or unknown, and
        cancel the step runs whose main run ended otherwise than Completed."""
        cancelling = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])))
        pool = WorkPoolFilter(name=WorkPoolFilterName(any_=[self.work_pool.name]))
        for run in await self.client.read_flow_runs(flow_run_filter=cancelling, work_pool_filter=pool):
            if left_cancelling(run, datetime.now(UTC)):
                await self._cancel(run.id, None)
        labels = [f"{STACK_LABEL}={self.stack}", f"{POOL_LABEL}={self.work_pool.name}"]
        found = await run_sync_in_worker_thread(self._containers, labels)
        if not found:
            return
        ids = [UUID(run_id) for _, run_id, _ in found]
        listed = await self.client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        runs = {run.id: run for run in listed}
        for container_id, run_id, running in found:
            flow_run_id = UUID(run_id)
            if flow_run_id not in self._waiting:  # no worker waits for it: see it to its end here
                self._waiting.add(flow_run_id)
                self._runs_task_group.start_soon(self._adopt, container_id, flow_run_id)
            run = runs.get(flow_run_id)
            if not running or flow_run_id in self._cancelled:
                continue
            role = await self._role(run) if run is not None else Role(STEP)
            action, why = reaping(run, role, datetime.now(UTC))
            if action == STOP:
                self._logger.warning("Stopping container %s: its run %s is %s", container_id, run_id, why)
                self._cancelled.add(flow_run_id)  # its exit is no crash
                await run_sync_in_worker_thread(self._stop, run_id)
            elif action == CANCEL:
                await self._cancel(flow_run_id, why)

    def _containers(self, labels: list[str]) -> list[tuple[str, str, bool]]:
        client = self._get_client()
        try:
            containers = client.containers.list(all=True, filters={"label": labels})
            return [(c.id, c.labels[RUN_LABEL], c.status == "running") for c in containers if RUN_LABEL in c.labels]
        finally:
            client.close()

    async def _adopt(self, container_id: str, flow_run_id: UUID) -> None:
        """Wait for a container this worker did not start, and report its run's crash if its
        container failed and the run has no final state."""
        if self._watch is not None:
            self._watch.add_in_flight_flow_run_id(flow_run_id)
        try:
            ended_with = await self._see_to_its_end(container_id, flow_run_id, None, [])
        finally:
            self._waiting.discard(flow_run_id)
            if self._watch is not None:
                self._watch.remove_in_flight_flow_run_id(flow_run_id)
        if ended_with is None or ended_with.code == 0:
            return
        try:
            run = await self.client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            self._exits.pop(flow_run_id, None)
            return
        if run.state is not None and run.state.is_final():
            self._exits.pop(flow_run_id, None)
            return
        await self._propose_crashed_state(run, ended_with.message())


STOP, CANCEL = "stop", "cancel"


def reaping(run: FlowRun | None, role: Role, now: datetime) -> tuple[str | None, str]:
    """What the sweep does with a running container of `run` (None: unknown to the server): stop
    it (its run is over, for FINAL_GRACE_S already, or unknown), cancel its run (a step whose main
    run ended otherwise than Completed), or nothing; and why."""
    if run is None:
        return STOP, "unknown to the server"
    if run.state is not None and run.state.is_final():
        if now - run.state.timestamp < timedelta(seconds=FINAL_GRACE_S):
            return None, ""  # its engine may still be on its way out, sending its last logs
        return STOP, run.state.name
    if role.role == STEP and ended_otherwise(role.main):
        return CANCEL, f"Cancelled: its pipeline's main run {ended(role.main)}."
    return None, ""


def left_cancelling(run: FlowRun, now: datetime) -> bool:
    """Whether a run has been Cancelling for longer than its worker takes to act on the event."""
    state = run.state
    return state is not None and state.is_cancelling() and now - state.timestamp > timedelta(seconds=SWEEP_S)


def wakes(event: Event, pool: str) -> bool:
    """Whether an event gives `pool`'s worker work: a run of the pool scheduled, or ended."""
    return event.resource.get("prefect.state-type") in WAKING and any(
        related.role == "work-pool" and related.get("prefect.resource.name") == pool for related in event.related
    )


def ended_otherwise(run: FlowRun | None) -> bool:
    """Whether a (main) run is over without having completed."""
    return run is not None and run.state is not None and run.state.is_final() and not run.state.is_completed()


def ended(run: FlowRun) -> str:
    return f"{run.name!r} ended {run.state.name}"


def data_volume() -> mounts.Volume | None:
    """The store's volume, if this host's store is one (a file:// store and DATA_VOLUME set); the
    worker has it where flow containers do."""
    name, store = os.environ.get("DATA_VOLUME", ""), os.environ.get("PIPELINE_DATA_URL", "").rstrip("/")
    if not name or not store.startswith("file:///"):
        return None
    client = docker.from_env()
    try:
        host = client.volumes.get(name).attrs["Mountpoint"]
    finally:
        client.close()
    at = store.removeprefix("file://")
    return mounts.Volume(name, host, at, Path(at), int(os.environ["FLOW_UID"]))
