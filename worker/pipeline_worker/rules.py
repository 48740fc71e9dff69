"""What a flow run's credential is good for: the rules the authority (authority.py) applies to each
request a flow container makes. A rule returns None to allow, or the reason it refuses.

The rule of thumb: a run may read and write its own records (its state, its task runs, logs,
artifacts, events, the variables named after it); a main flow may also create the runs of the steps
its pipeline declares, as children of its own task runs, and watch and cancel them. Nothing else.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
TRACEPARENT = "__OTEL_TRACEPARENT"  # the only label a run sets on another (run_deployment)
ATTEMPT = re.compile(r"attempt-[0-9]+")  # the only tag a main flow gives its steps
CANCEL = {"CANCELLING", "CANCELLED"}  # what a main flow may do to its steps' states
MAIN, STEP, MAINTENANCE = "main", "step", "maintenance"


def roles(setting: str) -> dict[str, str]:
    """FLOW_ROLES, `flow:role,...`, as {flow name: role}; a role other than main or maintenance is refused."""
    found = dict(pair.strip().split(":", 1) for pair in setting.split(",") if pair.strip())
    if wrong := sorted(role for role in found.values() if role not in (MAIN, MAINTENANCE)):
        raise ValueError(f"FLOW_ROLES has roles {wrong}: a flow is main, maintenance, or (unlisted) a step")
    return found


@dataclass(frozen=True)
class Run:
    """What the authority knows of the run a credential belongs to."""

    id: str
    role: str  # MAIN, STEP or MAINTENANCE (FLOW_ROLES in .env, by flow name)
    deployment_id: str | None
    parent_task_run_id: str | None
    work_queue_id: str | None
    work_pool_name: str | None
    steps: frozenset[str] = field(default_factory=frozenset)  # a main flow's: its pipeline's deployments
    store: str = ""  # PIPELINE_DATA_URL: where a main flow's steps may write
    pipeline: str | None = None  # a main flow's: its deployment's name, which names its steps' Variable


class Lookup(Protocol):
    """What the rules ask the server (authority.py reads it with the admin credential)."""

    async def task_run_flow(self, task_run_id: str) -> str | None: ...  # its flow run, or None

    async def parent_flow(self, flow_run_id: str) -> str | None: ...  # the flow run of its parent task run

    async def deployment_of(self, flow_run_id: str) -> str | None: ...

    async def deployment_name(self, deployment_id: str) -> str | None: ...  # flow/deployment

    async def deployment_image(self, deployment_id: str) -> str | None: ...


async def decide(method: str, path: str, query: dict[str, str], body: Any, run: Run, lookup: Lookup) -> str | None:
    """None if `run`'s container may make this request, else why it may not."""
    for pattern, methods, rule in RULES:
        match = re.fullmatch(pattern, path)
        if match and method in methods:
            return await rule(run, lookup, body, query, *match.groups())
    return f"{method} {path} is not a call a flow run makes"


async def anyone(*_: Any) -> None:
    return None


async def own_run(run: Run, lookup: Lookup, body: Any, query: dict, flow_run_id: str) -> str | None:
    """Read its own run, a step run it started, or (a main flow resuming) a run of its own pipeline."""
    if flow_run_id == run.id or await lookup.parent_flow(flow_run_id) == run.id:
        return None
    if run.role == MAIN and run.deployment_id and await lookup.deployment_of(flow_run_id) == run.deployment_id:
        return None
    if run.role == MAINTENANCE:
        return None
    return f"flow run {flow_run_id} is not this run's own, nor one it started"


async def own_flow_run_write(run: Run, lookup: Lookup, body: Any, query: dict, flow_run_id: str) -> str | None:
    """Update its own run: only what the engine updates."""
    if flow_run_id != run.id:
        return f"flow run {flow_run_id} is not this run's own"
    extra = sorted(set(body or {}) - {"flow_version", "empirical_policy"})
    return f"a run may not change its own {', '.join(extra)}" if extra else None


async def own_labels(run: Run, lookup: Lookup, body: Any, query: dict, flow_run_id: str) -> str | None:
    return None if flow_run_id == run.id else f"flow run {flow_run_id} is not this run's own"


async def flow_run_state(run: Run, lookup: Lookup, body: Any, query: dict, flow_run_id: str) -> str | None:
    """Any state of its own run; Cancelling or Cancelled, with no data, of a step run it started."""
    if flow_run_id == run.id:
        return None
    if await lookup.parent_flow(flow_run_id) != run.id:
        return f"flow run {flow_run_id} is not this run's own, nor one it started"
    state = (body or {}).get("state") or {}
    if state.get("type") not in CANCEL or state.get("data") is not None:
        return f"a main flow may only cancel the runs it started, not set them {state.get('type')}"
    return None


async def own_task_run(run: Run, lookup: Lookup, body: Any, query: dict, task_run_id: str) -> str | None:
    if task_run_id == run.parent_task_run_id or await lookup.task_run_flow(task_run_id) == run.id:
        return None
    return f"task run {task_run_id} is not of this run"


async def own_task_run_write(run: Run, lookup: Lookup, body: Any, query: dict, task_run_id: str) -> str | None:
    return None if await lookup.task_run_flow(task_run_id) == run.id else f"task run {task_run_id} is not of this run"


async def new_task_run(run: Run, lookup: Lookup, body: Any, query: dict) -> str | None:
    flow_run_id = str((body or {}).get("flow_run_id"))
    return None if flow_run_id == run.id else f"a task run of flow run {flow_run_id}, not of this run"


async def own_records(run: Run, lookup: Lookup, body: Any, query: dict) -> str | None:
    """Logs and artifacts: each of its own run, and of its own task runs if of one."""
    for record in body if isinstance(body, list) else [body or {}]:
        if str(record.get("flow_run_id")) != run.id:
            return f"a record of flow run {record.get('flow_run_id')}, not of this run"
        if record.get("task_run_id") and await lookup.task_run_flow(str(record["task_run_id"])) != run.id:
            return f"a record of task run {record['task_run_id']}, not of this run"
    return None


async def own_deployment(run: Run, lookup: Lookup, body: Any, query: dict, deployment_id: str) -> str | None:
    """Its own deployment (the engine loads its flow from it), or one of its pipeline's steps."""
    if deployment_id == run.deployment_id:
        return None
    if run.role == MAIN and await lookup.deployment_name(deployment_id) in run.steps:
        return None
    return f"deployment {deployment_id} is not this run's, nor a step of its pipeline"


async def step_by_name(run: Run, lookup: Lookup, body: Any, query: dict, flow: str, name: str) -> str | None:
    if run.role == MAIN and f"{flow}/{name}" in run.steps:
        return None
    return f"deployment {flow}/{name} is not a step of this run's pipeline"


async def start_step(run: Run, lookup: Lookup, body: Any, query: dict, deployment_id: str) -> str | None:
    """A main flow starts a step of its pipeline: as a child of one of its own task runs, on a
    reference, writing into its own run's directory, with no job variable but a replay's image of
    the step's own repository, and no tag but its attempt."""
    if run.role != MAIN or (name := await lookup.deployment_name(deployment_id)) not in run.steps:
        return f"deployment {deployment_id} is not a step of this run's pipeline"
    body = body or {}
    if await lookup.task_run_flow(str(body.get("parent_task_run_id"))) != run.id:
        return f"a step run must be a child of this run's own task runs, not {body.get('parent_task_run_id')}"
    if not str(body.get("idempotency_key") or "").startswith(f"{run.id}/"):
        return "a step run's idempotency key must start with this run's id"
    out = str((body.get("parameters") or {}).get("out", ""))
    if not out.startswith(f"{run.store}/runs/{run.id}/") or ".." in out.split("/"):
        return f"step {name} may write only inside this run's directory, not {out!r}"
    variables = body.get("job_variables") or {}
    if set(variables) - {"image"}:
        return f"a step run's job variables may be its image only, not {sorted(set(variables) - {'image'})}"
    if "image" in variables:
        own = str(await lookup.deployment_image(deployment_id) or "").split("@", 1)[0]
        if str(variables["image"]).split("@", 1)[0] != own:
            return f"step {name} runs images of {own}, not {variables['image']}"
    if bad := [t for t in body.get("tags") or [] if not ATTEMPT.fullmatch(str(t))]:
        return f"a step run's tags may be its attempt only, not {bad}"
    if set(body.get("labels") or {}) - {TRACEPARENT}:
        return "a step run's labels may be its trace parent only"
    if body.get("name") or body.get("work_queue_name"):
        return "a step run's name and work queue are its deployment's"
    if (body.get("state") or {}).get("type", "SCHEDULED") != "SCHEDULED":
        return "a step run starts Scheduled"
    return None


async def filter_own_runs(run: Run, lookup: Lookup, body: Any, query: dict) -> str | None:
    """The engine looks for its own run by id (is it suspended?), or for the child of one of its
    task runs: a filter that names those, and nothing wider."""
    body = body or {}
    if any(body.get(key) for key in ("flows", "task_runs", "deployments", "work_pools", "work_pool_queues")):
        return "a flow run filter may filter on flow runs only"
    runs = {key: value for key, value in (body.get("flow_runs") or {}).items() if value is not None}
    ids = (runs.get("id") or {}).get("any_") or []
    parents = (runs.get("parent_task_run_id") or {}).get("any_") or []
    flows = (runs.get("parent_flow_run_id") or {}).get("any_") or []
    if flows and {str(f) for f in flows} == {run.id}:
        return None  # the step runs it started (its live view)
    if not ids and not parents:
        return "a flow run filter must name this run, or its own task runs' children, by id"
    for flow_run_id in ids:
        if str(flow_run_id) != run.id and await lookup.parent_flow(str(flow_run_id)) != run.id:
            return f"flow run {flow_run_id} is not this run's own, nor one it started"
    for task_run_id in parents:
        if await lookup.task_run_flow(str(task_run_id)) != run.id:
            return f"task run {task_run_id} is not of this run"
    return None


async def maintenance_only(run: Run, *_: Any) -> str | None:
    return None if run.role == MAINTENANCE else "only the maintenance flows (retention) list all runs or variables"


def steps_variable(pipeline: str) -> str:
    """The Variable of a pipeline's steps (stepkit.steps_variable: the worker's image has no kit)."""
    return f"pipeline-steps-{pipeline}"


async def own_variable(run: Run, lookup: Lookup, body: Any, query: dict, name: str) -> str | None:
    """Variables named after its own run, e.g. subflow-output-<run id>; retention removes any."""
    if name.endswith(f"-{run.id}") or (run.role == MAINTENANCE and re.fullmatch(rf"[\w-]+-{ID}", name)):
        return None
    return f"variable {name!r} is not named after this run"


async def read_variable(run: Run, lookup: Lookup, body: Any, query: dict, name: str) -> str | None:
    if run.role == MAIN and run.pipeline and name == steps_variable(run.pipeline):  # its steps as last deployed
        return None
    return await own_variable(run, lookup, body, query, name)


async def new_variable(run: Run, lookup: Lookup, body: Any, query: dict) -> str | None:
    return await own_variable(run, lookup, body, query, str((body or {}).get("name")))


async def own_queue(run: Run, lookup: Lookup, body: Any, query: dict, queue_id: str) -> str | None:
    return None if queue_id == run.work_queue_id else f"work queue {queue_id} is not this run's"


async def own_pool(run: Run, lookup: Lookup, body: Any, query: dict, pool: str) -> str | None:
    return None if pool == run.work_pool_name else f"work pool {pool} is not this run's"


# (path pattern, methods, rule), the first match decides; paths as the server sees them, under /api.
RULES: list[tuple[str, set[str], Any]] = [
    (r"/api/(health|admin/version|admin/storage|csrf-token)", {"GET"}, anyone),
    (rf"/api/flow_runs/({ID})", {"GET"}, own_run),
    (rf"/api/flow_runs/({ID})", {"PATCH"}, own_flow_run_write),
    (rf"/api/flow_runs/({ID})/labels", {"PATCH"}, own_labels),
    (rf"/api/flow_runs/({ID})/set_state", {"POST"}, flow_run_state),
    (r"/api/flow_runs/filter", {"POST"}, filter_own_runs),
    (rf"/api/task_runs/({ID})", {"GET"}, own_task_run),
    (rf"/api/task_runs/({ID})/set_state", {"POST"}, own_task_run_write),
    (r"/api/task_runs/", {"POST"}, new_task_run),
    (rf"/api/flows/{ID}", {"GET"}, anyone),
    (rf"/api/deployments/({ID})", {"GET"}, own_deployment),
    (r"/api/deployments/name/([\w.-]+)/([\w.-]+)", {"GET"}, step_by_name),
    (rf"/api/deployments/({ID})/create_flow_run", {"POST"}, start_step),
    (rf"/api/work_queues/({ID})", {"GET"}, own_queue),
    (r"/api/work_pools/([\w.-]+)", {"GET"}, own_pool),
    (r"/api/(?:logs|artifacts)/", {"POST"}, own_records),
    (r"/api/variables/name/([\w.-]+)", {"GET"}, read_variable),
    (r"/api/variables/name/([\w.-]+)", {"PATCH", "DELETE"}, own_variable),
    (r"/api/variables/", {"POST"}, new_variable),
    (r"/api/variables/filter", {"POST"}, maintenance_only),
]


async def event_refusal(event: dict[str, Any], run: Run, lookup: Lookup) -> str | None:
    """None if `run`'s container may emit `event`: about its own run, or related to it and about
    one of its own task runs (a new one, or one the server has of this run)."""
    resource = str((event.get("resource") or {}).get("prefect.resource.id", ""))
    own = f"prefect.flow-run.{run.id}"
    related = {str(r.get("prefect.resource.id")) for r in event.get("related") or [] if isinstance(r, dict)}
    if resource == own:
        return None
    if own not in related:
        return f"event {event.get('event')!r} about {resource} is not of this run"
    if resource.startswith("prefect.flow-run."):
        return f"event {event.get('event')!r} is about another flow run, {resource}"
    if resource.startswith("prefect.task-run."):
        task_run = (event.get("payload") or {}).get("task_run") or {}
        known = await lookup.task_run_flow(resource.removeprefix("prefect.task-run."))
        if str(task_run.get("flow_run_id", run.id)) != run.id or known not in (None, run.id):
            return f"event {event.get('event')!r} is about task run {resource}, not of this run"
    return None


def narrowed(event_filter: dict[str, Any], run: Run, children: set[str]) -> tuple[dict[str, Any], str | None]:
    """The events `run`'s container may watch with `event_filter`: those of its own run and of the
    step runs it started (`children`). A filter that names no resource (the engine's own watch for
    its suspension) is narrowed to them; one that names others is refused (the reason)."""
    allowed = sorted(f"prefect.flow-run.{i}" for i in {run.id, *children})
    resource = event_filter.get("resource") or {}
    ids = resource.get("id") or []
    if set(map(str, ids)) - set(allowed) or any(resource.get(k) for k in ("id_prefix", "labels")):
        return event_filter, "a run may watch the events of its own run and of the step runs it started only"
    return {**event_filter, "resource": {**resource, "id": ids or allowed}}, None
