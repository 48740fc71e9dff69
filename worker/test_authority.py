"""The authority's rules (rules.py), table-driven against a real Prefect API (no Docker): what a
flow run's own credential is good for, and every way of reaching beyond it, refused by name."""

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from pipeline_worker.authority import Server, run_of
from pipeline_worker.policy import credential
from pipeline_worker.rules import decide, event_refusal, narrowed
from prefect import get_client, task
from prefect.settings import PREFECT_API_URL

STORE = "file:///store"
ROLES = {"main-flow": "main", "retention": "maintenance"}
IMAGE = "registry.example:5000/validate@sha256:" + "a" * 64


def image_of(flow: str) -> str:
    return IMAGE.replace("validate", flow)


@task
def placeholder() -> None:
    """What run_deployment's parent task runs are made of."""


@dataclass
class World:
    """Two pipelines' runs on the server: main runs, their task runs and their step runs."""

    main: str
    main_task: str
    step: str
    other_main: str
    other_task: str
    other_step: str
    validate: str
    subflow: str
    enrich: str
    retention: str

    def judge(self, who: str, ask: Any) -> Any:
        """`ask(server, run)` for the run `who`, with a Server of its own event loop."""

        async def go() -> Any:
            server = Server(PREFECT_API_URL.value().removesuffix("/api"), None, ROLES, STORE)
            return await ask(server, await server.run(getattr(self, who)))

        return asyncio.run(go())


@pytest.fixture(scope="module")
def world(prefect_api) -> World:
    with get_client(sync_client=True) as client:
        flows = {
            name: client.create_flow_from_name(name)
            for name in ("main-flow", "validate", "subflow", "enrich", "retention")
        }
        deployment = {
            name: client.create_deployment(flows[flow], name.split("/")[1], job_variables={"image": image_of(flow)})
            for name, flow in [("main-flow/main", "main-flow"), ("main-flow/other", "main-flow"),
                               ("validate/validate", "validate"), ("subflow/subflow", "subflow"),
                               ("enrich/enrich", "enrich"), ("retention/retention", "retention")]
        }  # fmt: skip
        main = client.create_flow_run_from_deployment(
            deployment["main-flow/main"], parameters={"steps": ["validate/validate", ["subflow/subflow"]]}
        )
        other = client.create_flow_run_from_deployment(
            deployment["main-flow/other"], parameters={"steps": [{"step": "enrich/enrich"}]}
        )
        tasks = {
            run.id: client.create_task_run(placeholder, flow_run_id=run.id, dynamic_key=str(uuid.uuid4()))
            for run in (main, other)
        }
        step = client.create_flow_run_from_deployment(
            deployment["validate/validate"], parent_task_run_id=tasks[main.id].id, parameters={}
        )
        other_step = client.create_flow_run_from_deployment(
            deployment["enrich/enrich"], parent_task_run_id=tasks[other.id].id, parameters={}
        )
        retention = client.create_flow_run_from_deployment(deployment["retention/retention"])
    ids = {k: str(v) for k, v in deployment.items()}
    return World(
        str(main.id), str(tasks[main.id].id), str(step.id), str(other.id), str(tasks[other.id].id), str(other_step.id),
        ids["validate/validate"], ids["subflow/subflow"], ids["enrich/enrich"], str(retention.id),
    )  # fmt: skip


def create(w: World, **changes: Any) -> dict[str, Any]:
    """The body run_deployment sends to start validate for the main run, with `changes`."""
    body = {
        "parameters": {"data": {}, "out": f"{STORE}/runs/{w.main}/validate"},
        "parent_task_run_id": w.main_task,
        "idempotency_key": f"{w.main}/{STORE}/runs/{w.main}/validate/1",
        "state": {"type": "SCHEDULED"},
        "tags": [],
        "labels": {"__OTEL_TRACEPARENT": "00-x"},
        "job_variables": None,
    }
    return {**body, **changes}


FILTER = "/api/flow_runs/filter"
# (who, method, path, body, None if allowed or a part of the refusal). `who` and {names} are World's.
CASES = [
    # Its own run and records.
    ("main", "GET", "/api/flow_runs/{main}", None, None),
    ("main", "GET", "/api/flow_runs/{step}", None, None),  # a step it started
    ("main", "GET", "/api/flow_runs/{other_main}", None, "is not this run's own"),
    ("step", "GET", "/api/flow_runs/{main}", None, "is not this run's own"),
    ("step", "GET", "/api/flow_runs/{other_step}", None, "is not this run's own"),
    ("retention", "GET", "/api/flow_runs/{other_main}", None, None),  # maintenance reads every run
    ("main", "PATCH", "/api/flow_runs/{main}", {"flow_version": "1", "empirical_policy": {}}, None),
    (
        "main",
        "PATCH",
        "/api/flow_runs/{main}",
        {"infrastructure_pid": "x:evil"},
        "may not change its own infrastructure_pid",
    ),
    ("main", "PATCH", "/api/flow_runs/{main}", {"parameters": {}, "name": "gateway"}, "name, parameters"),
    ("step", "PATCH", "/api/flow_runs/{main}", {"flow_version": "1"}, "is not this run's own"),
    ("main", "PATCH", "/api/flow_runs/{main}/labels", {"a": "b"}, None),
    ("step", "PATCH", "/api/flow_runs/{other_step}/labels", {"a": "b"}, "is not this run's own"),
    # States: any of its own; a main flow may cancel its steps, nothing else.
    ("step", "POST", "/api/flow_runs/{step}/set_state", {"state": {"type": "COMPLETED", "data": {"x": 1}}}, None),
    ("main", "POST", "/api/flow_runs/{step}/set_state", {"state": {"type": "CANCELLING"}}, None),
    (
        "main",
        "POST",
        "/api/flow_runs/{step}/set_state",
        {"state": {"type": "COMPLETED", "data": {}}},
        "may only cancel",
    ),
    (
        "main",
        "POST",
        "/api/flow_runs/{other_step}/set_state",
        {"state": {"type": "CANCELLING"}},
        "is not this run's own",
    ),
    (
        "step",
        "POST",
        "/api/flow_runs/{other_step}/set_state",
        {"state": {"type": "CANCELLING"}},
        "is not this run's own",
    ),
    ("step", "POST", "/api/flow_runs/{main}/set_state", {"state": {"type": "CRASHED"}}, "is not this run's own"),
    # Task runs, logs, artifacts.
    ("main", "POST", "/api/task_runs/", {"flow_run_id": "{main}"}, None),
    ("main", "POST", "/api/task_runs/", {"flow_run_id": "{other_main}"}, "not of this run"),
    ("main", "GET", "/api/task_runs/{main_task}", None, None),
    ("step", "GET", "/api/task_runs/{main_task}", None, None),  # its parent task run
    ("step", "GET", "/api/task_runs/{other_task}", None, "is not of this run"),
    ("main", "POST", "/api/task_runs/{main_task}/set_state", {"state": {"type": "COMPLETED"}}, None),
    ("step", "POST", "/api/task_runs/{main_task}/set_state", {"state": {"type": "COMPLETED"}}, "is not of this run"),
    ("main", "POST", "/api/logs/", [{"flow_run_id": "{main}", "task_run_id": "{main_task}"}], None),
    ("step", "POST", "/api/logs/", [{"flow_run_id": "{step}"}, {"flow_run_id": "{main}"}], "not of this run"),
    ("main", "POST", "/api/logs/", [{"flow_run_id": "{main}", "task_run_id": "{other_task}"}], "not of this run"),
    ("step", "POST", "/api/artifacts/", {"flow_run_id": "{step}", "key": "validate-report"}, None),
    ("step", "POST", "/api/artifacts/", {"flow_run_id": "{other_step}"}, "not of this run"),
    # Deployments: its own; a main flow's pipeline's steps, and starting them by the rules.
    ("step", "GET", "/api/deployments/{validate}", None, None),
    ("step", "GET", "/api/deployments/{subflow}", None, "nor a step of its pipeline"),
    ("main", "GET", "/api/deployments/{subflow}", None, None),
    ("main", "GET", "/api/deployments/{enrich}", None, "nor a step of its pipeline"),
    ("main", "GET", "/api/deployments/name/validate/validate", None, None),
    ("main", "GET", "/api/deployments/name/enrich/enrich", None, "not a step of this run's pipeline"),
    ("step", "GET", "/api/deployments/name/validate/validate", None, "not a step of this run's pipeline"),
    ("main", "POST", "/api/deployments/{validate}/create_flow_run", "create", None),
    ("main", "POST", "/api/deployments/{enrich}/create_flow_run", "create", "not a step of this run's pipeline"),
    ("step", "POST", "/api/deployments/{validate}/create_flow_run", "create", "not a step of this run's pipeline"),
    (
        "main",
        "POST",
        "/api/deployments/{validate}/create_flow_run",
        ("create", {"parent_task_run_id": "{other_task}"}),
        "child of this run's own task runs",
    ),
    (
        "main",
        "POST",
        "/api/deployments/{validate}/create_flow_run",
        ("create", {"idempotency_key": "{other_main}/x/1"}),
        "idempotency key",
    ),
    (
        "main",
        "POST",
        "/api/deployments/{validate}/create_flow_run",
        ("create", {"parameters": {"out": f"{STORE}/cache"}}),
        "only inside this run's directory",
    ),
    (
        "main",
        "POST",
        "/api/deployments/{validate}/create_flow_run",
        ("create", {"parameters": {"out": f"{STORE}/runs/{{main}}/../x"}}),
        "only inside this run's directory",
    ),
    (
        "main",
        "POST",
        "/api/deployments/{validate}/create_flow_run",
        ("create", {"job_variables": {"image": IMAGE}}),
        None,
    ),  # a replay
    (
        "main",
        "POST",
        "/api/deployments/{validate}/create_flow_run",
        ("create", {"job_variables": {"image": "registry.example:5000/evil@sha256:1"}}),
        "runs images of",
    ),
    (
        "main",
        "POST",
        "/api/deployments/{validate}/create_flow_run",
        ("create", {"job_variables": {"env": {"X": "1"}}}),
        "may be its image only",
    ),
    (
        "main",
        "POST",
        "/api/deployments/{validate}/create_flow_run",
        ("create", {"name": "gateway"}),
        "name and work queue",
    ),
    (
        "main",
        "POST",
        "/api/deployments/{validate}/create_flow_run",
        ("create", {"tags": ["attempt-2", "big-slot"]}),
        "tags may be its attempt only",
    ),
    (
        "main",
        "POST",
        "/api/deployments/{validate}/create_flow_run",
        ("create", {"state": {"type": "COMPLETED"}}),
        "starts Scheduled",
    ),
    # The engine's look-up of a task run's child; nothing wider.
    (
        "main",
        "POST",
        "/api/flow_runs/filter",
        {"flow_runs": {"parent_task_run_id": {"any_": ["{main_task}"]}}, "limit": 1},
        None,
    ),
    (
        "main",
        "POST",
        "/api/flow_runs/filter",
        {"flow_runs": {"parent_task_run_id": {"any_": ["{other_task}"]}}},
        "is not of this run",
    ),
    (
        "main",
        "POST",
        FILTER,
        {"flow_runs": {"id": {"any_": ["{main}"]}, "state": {"type": {"any_": ["PAUSED"]}}}},
        None,
    ),
    ("main", "POST", FILTER, {"flow_runs": {"id": {"any_": ["{main}", "{other_main}"]}}}, "is not this run's own"),
    ("main", "POST", FILTER, {"flow_runs": {"id": {"any_": ["{main}"]}}, "deployments": {"id": {}}}, "flow runs only"),
    ("main", "POST", FILTER, {}, "must name this run, or its own task runs' children"),
    ("main", "POST", FILTER, {"flow_runs": {"parent_flow_run_id": {"any_": ["{main}"]}}}, None),
    ("main", "POST", FILTER, {"flow_runs": {"parent_flow_run_id": {"any_": ["{other_main}"]}}}, "must name this run"),
    # Variables: named after its own run; the registered steps for a main flow.
    ("step", "GET", "/api/variables/name/subflow-output-{step}", None, None),
    ("step", "POST", "/api/variables/", {"name": "subflow-output-{step}", "value": {}}, None),
    ("step", "POST", "/api/variables/", {"name": "pipeline-steps-main", "value": []}, "not named after this run"),
    ("step", "PATCH", "/api/variables/name/subflow-output-{other_step}", {"value": 1}, "not named after this run"),
    ("main", "GET", "/api/variables/name/pipeline-steps-main", None, None),  # its pipeline's: its deployment's name
    ("main", "GET", "/api/variables/name/pipeline-steps-other", None, "not named after this run"),
    ("main", "PATCH", "/api/variables/name/pipeline-steps-main", {"value": []}, "not named after this run"),
    ("step", "GET", "/api/variables/name/pipeline-steps-main", None, "not named after this run"),
    ("retention", "POST", "/api/variables/filter", {}, None),
    ("main", "POST", "/api/variables/filter", {}, "only the maintenance flows"),
    ("retention", "DELETE", "/api/variables/name/subflow-output-{step}", None, None),
    # What no flow run calls: blocks (the registry's password), pools, deployments, automations.
    (
        "main",
        "GET",
        "/api/block_types/slug/docker-registry-credentials/block_documents/name/pipeline-registry",
        None,
        "not a call a flow run makes",
    ),
    ("main", "GET", "/api/block_documents/{validate}", None, "not a call a flow run makes"),
    ("main", "PATCH", "/api/work_pools/a-pool", {"base_job_template": {}}, "not a call a flow run makes"),
    ("main", "POST", "/api/work_pools/", {}, "not a call a flow run makes"),
    ("main", "POST", "/api/deployments/", {}, "not a call a flow run makes"),
    ("main", "POST", "/api/automations/", {}, "not a call a flow run makes"),
    ("main", "POST", "/api/flow_runs/", {}, "not a call a flow run makes"),
    ("retention", "DELETE", "/api/flow_runs/{main}", None, "not a call a flow run makes"),
    ("main", "GET", "/api/health", None, None),
    ("step", "GET", "/api/admin/storage", None, None),  # the server's default result storage: its id
]


def filled(value: Any, w: World) -> Any:
    """`value` with World's {names} filled in."""
    if isinstance(value, str):
        return value.format(**{k: v for k, v in vars(w).items() if isinstance(v, str)})
    if isinstance(value, list):
        return [filled(v, w) for v in value]
    if isinstance(value, dict):
        return {k: filled(v, w) for k, v in value.items()}
    return value


@pytest.mark.parametrize(("who", "method", "path", "body", "refusal"), CASES)
def test_a_flow_runs_credential_is_good_for_its_own_run_only(world, who, method, path, body, refusal):
    if body == "create":
        body = create(world)
    elif isinstance(body, tuple):
        body = create(world, **filled(body[1], world))
    path, body = filled(path, world), filled(body, world)
    reason = world.judge(who, lambda server, run: decide(method, path, {}, body, run, server))
    if refusal is None:
        assert reason is None, reason
    else:
        assert reason is not None and refusal in reason, reason


OWN = "prefect.flow-run.{main}"
MINE, THEIRS = {"task_run": {"flow_run_id": "{main}"}}, {"task_run": {"flow_run_id": "{other_main}"}}


@pytest.mark.parametrize(
    ("resource", "related", "payload", "refusal"),
    [
        (OWN, [], {}, None),  # its heartbeat
        ("prefect.flow-run.{other_main}", [], {}, "is not of this run"),  # a forged heartbeat
        ("prefect.flow-run.{other_main}", [OWN], {}, "about another flow run"),
        ("prefect.task-run.{main_task}", [OWN], MINE, None),
        (f"prefect.task-run.{uuid.uuid4()}", [OWN], MINE, None),  # a new one
        ("prefect.task-run.{other_task}", [OWN], MINE, "not of this run"),
        (f"prefect.task-run.{uuid.uuid4()}", [OWN], THEIRS, "not of this run"),
        ("prefect.block-document.x", [OWN], {}, None),
        ("prefect.block-document.x", [], {}, "is not of this run"),
    ],
)
def test_a_container_emits_events_of_its_own_run_only(world, resource, related, payload, refusal):
    related = [{"prefect.resource.id": r, "prefect.resource.role": "flow-run"} for r in related]
    event = filled(
        {"event": "x", "resource": {"prefect.resource.id": resource}, "payload": payload, "related": related}, world
    )
    reason = world.judge("main", lambda server, run: event_refusal(event, run, server))
    assert reason is None if refusal is None else refusal in reason, reason


def test_a_container_watches_its_own_runs_events_only(world):
    async def children(server, run):
        return run, await server.children(run.id)

    run, children = world.judge("main", children)
    assert children == {world.step}
    mine = {"resource": {"id": [f"prefect.flow-run.{world.step}"]}}
    assert narrowed(mine, run, children) == (mine, None)
    # The engine watches for its own suspension by event name only: narrowed to what it may see.
    suspension = {"event": {"name": ["prefect.flow-run.Suspended"]}, "resource": None}
    own = sorted(f"prefect.flow-run.{i}" for i in (world.main, world.step))
    assert narrowed(suspension, run, children) == ({**suspension, "resource": {"id": own}}, None)
    others = [{"resource": {"id": [f"prefect.flow-run.{world.other_step}"]}}, {"resource": {"id_prefix": ["prefect."]}}]
    for wider in others:
        assert "its own run and of the step runs it started" in narrowed(wider, run, children)[1]


def test_the_credential_is_the_runs_own():
    key, run_id = b"k" * 32, str(uuid.uuid4())
    assert run_of(credential(key, run_id), key) == run_id
    mac = credential(key, run_id).partition(":")[2]
    for forged in (credential(b"x" * 32, run_id), f"{uuid.uuid4()}:{mac}", run_id, f"{run_id}:", "", None):
        assert run_of(forged, key) is None
