"""Faults of the platform, not of the data, on real Docker (README's *Faults*): a pipeline in flight
completes through each, correct by content, each step completed once, no run left unfinished."""

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from pipeline_worker import render
from prefect.events.schemas.automations import AutomationCore
from prefect.states import Cancelling, Pending

from conftest import iris_rows, to_csv
from tests.harness import ROOT, wait_for
from tests.test_failures import assert_failed_cleanly, step_runs

pytestmark = pytest.mark.e2e


def assert_completed_once(stack, run, rows: list[dict[str, str]]) -> None:
    """Completed and correct by content; each step completed exactly once (attempts that crashed
    aside) and none of its runs left unfinished."""
    assert run.state.is_completed(), run.state
    output = stack.output(run)
    subflow = output["results"]["subflow/subflow"]
    assert subflow["rows"] == output["input"]["rows"] == len(rows)
    for group in subflow["summary"]:
        members = [r for r in rows if r["species"] == group["species"]]
        mean = sum(float(r["sepal_length"]) for r in members) / len(members)
        assert group["count"] == len(members) and abs(group["mean_sepal_length"] - mean) < 1e-3
    with stack.api() as client:
        assert client.read_variable_by_name(subflow["variable"]).value["summary"] == subflow["summary"]
    attempts = step_runs(stack, run.id)
    assert sorted(attempts) == ["subflow", "validate"], attempts
    for flow, runs in attempts.items():
        assert [r.state.type.value for r in runs] == ["CRASHED"] * (len(runs) - 1) + ["COMPLETED"], (flow, runs)
    assert subflow["flow_run_id"] == str(attempts["subflow"][-1].id)


def restart_server(stack) -> None:
    stack.compose("restart", "prefect-server")
    wait_for("the server to answer again, from its database", stack.ready, 120)


def test_three_pipelines_at_once_through_two_server_restarts(stack, serve):
    """Pipelines in flight while the server restarts twice; none mixes, loses or repeats a step.
    (Many more at once, without restarts: the benchmark's throughput stage.)"""
    rows = iris_rows()
    sources = {i: serve(f"part{i}.csv", to_csv(rows[i::3])) for i in range(3)}
    runs = {i: stack.start("main-flow/main", source=url) for i, url in sources.items()}  # at once
    ids = [run.id for run in runs.values()]
    for _ in range(2):
        wait_for("a step running", lambda: steps_running(stack, ids), 300)
        restart_server(stack)
    finished = {i: stack.wait_final(run.id, timeout=420) for i, run in runs.items()}  # all at once: minutes
    for i, run in finished.items():
        assert stack.output(run)["source"] == sources[i]
        assert_completed_once(stack, run, rows[i::3])


def steps_running(stack, ids: list) -> list:
    return [child for child in stack.children(*ids) if child.state.is_running()]


def history(stack) -> dict[str, int]:
    """How many deployments, variables, artifacts and flow runs the server holds."""
    with stack.api() as client:
        return {
            "deployments": len(client.read_deployments()),
            "variables": len(client.read_variables()),
            "artifacts": len(client.read_artifacts()),
            # Not the scheduler's: it may schedule the retention deployment's next runs at any time.
            "flow_runs": len([r for r in client.read_flow_runs() if not r.auto_scheduled]),
        }


def polled_since(stack, since: datetime) -> dict[str, bool]:
    """Whether a worker of each pool has polled the server since `since`: a worker listed ONLINE
    may be one from before, whose last heartbeat is recent enough."""
    with stack.api() as client:
        return {
            pool: any(w.last_heartbeat_time > since for w in client.read_workers_for_work_pool(stack.env()[pool]))
            for pool in ("FLOW_POOL", "SUBFLOW_POOL")
        }


def test_a_stack_down_and_up_keeps_its_state(stack):
    """Postgres keeps everything on its volume; `up --wait` returns once the workers poll again."""
    before = history(stack)
    if not all(before.values()):  # run alone: the earlier tests left no run, variable or artifact
        assert stack.run("main-flow/main").state.is_completed()
        before = history(stack)
    assert all(before.values()), before
    stack.compose("down")
    restarted = datetime.now(UTC)
    stack.compose("up", "-d", "--wait")
    assert polled_since(stack, restarted) == {"FLOW_POOL": True, "SUBFLOW_POOL": True}
    assert history(stack) == before
    assert stack.run("main-flow/main").state.is_completed()


def down_as_each_step_starts(stack):
    """Each step's container, frozen as it starts, runs its engine while a service is away: the
    server as validate starts, the database as subflow does. One pipeline, both faults."""
    run = stack.start("main-flow/main")
    away_as_it_starts(stack, stack.child(run.id, "validate"), "prefect-server")
    away_as_it_starts(stack, stack.child(run.id, "subflow"), "postgres")
    return run


def away_as_it_starts(stack, child, service: str) -> None:
    """`service` stopped while the step run `child`'s container is frozen; started again once the
    container's first API call was refused."""
    container = wait_for("the step's container", lambda: stack.containers(child.id, running=True), 120, every=0.1)
    stack.sh("docker", "pause", *container)
    stack.compose("stop", service)
    try:
        stack.sh("docker", "unpause", *container)
        refused = re.compile(rf"/api/flow_runs/{child.id}\S* HTTP/1.1\" 50[0-4] ")  # the gateway's log
        wait_for("the step's API call refused", lambda: refused.search(stack.compose("logs", "gateway").stdout))
    finally:
        stack.compose("start", service)
    wait_for("the server to answer again, from its database", stack.ready, 120)


def worker_away_as_a_step_waits(stack):
    """Steps wait in their pool's queue: a run past its `step_timeout_s` cancels its step and
    fails; the other one completes once the worker is back."""
    stack.compose("stop", "worker-subflow")
    try:
        run = stack.start("main-flow/main")
        late = stack.run("main-flow/main", step_timeout_s=10)
        assert stack.child(run.id, "validate").state.is_scheduled()
    finally:
        stack.compose("start", "worker-subflow")
    assert_failed_cleanly(stack, late, "did not finish within 10.0s", children=1)
    assert f"Check that a worker is polling work pool '{stack.env()['SUBFLOW_POOL']}'" in late.state.message
    assert stack.child(late.id, "validate").state.is_cancelled()
    return run


def registry_away_as_a_step_pulls(stack):
    """The step's image must be pulled: its run crashes and is started again until the registry is back."""
    stack.forget_image("subflow/subflow")
    stack.compose("stop", "registry")
    try:
        run = stack.start("main-flow/main", steps=["validate/validate", {"step": "subflow/subflow", "retries": 8}])
        first = wait_for("a crashed subflow", lambda: crashed(stack, run.id), 300)
    finally:
        stack.compose("start", "registry")
    assert str(stack.registry_port) in first.state.message, first.state  # its pull from the registry failed
    return run


def crashed(stack, run_id) -> Any:
    """The first step run of a main run that Crashed, if any."""
    return next((c for runs in step_runs(stack, run_id).values() for c in runs if c.state.is_crashed()), None)


@pytest.mark.parametrize(
    "fault",
    [down_as_each_step_starts, worker_away_as_a_step_waits, registry_away_as_a_step_pulls],
    ids=["server then database down", "worker away", "registry away"],
)
def test_a_pipeline_in_flight_completes_through(stack, fault):
    run = fault(stack)
    wait_for("the server to answer again, from its database", stack.ready, 120)
    assert_completed_once(stack, stack.wait_final(run.id), iris_rows())


def heartbeats(stack, run_id) -> int:
    """How many heartbeats of a run the server has received."""
    query = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{run_id}"]},
        }
    }
    with stack.api() as client:
        return len(client.request("POST", "/events/filter", json=query).json()["events"])


SILENCE = "35"  # seconds: pools/automations.json as FLOW_SILENCE_SECONDS=35 renders it, not the stack's 90


def test_a_run_whose_container_dies_unwatched_is_crashed_when_its_heartbeats_stop(stack):
    """Its workers are down when its container dies: the automation of pools/automations.json frees
    the run (and its pool slot) instead of leaving it Running for ever. The automation is applied
    again as a FLOW_SILENCE_SECONDS of 35 renders it, for this test only, which then waits 35 s, not 90
    (after a second heartbeat). Its step, cancelled while no worker was there to see the event, is
    ended Cancelled by the sweep once they are back, its container never started."""
    (spec,) = render(json.loads((ROOT / "pools" / "automations.json").read_text()), {"FLOW_SILENCE_SECONDS": SILENCE})
    spec = {**spec, "name": f"{spec['name']}-test", "trigger": {**spec["trigger"], "within": int(SILENCE)}}
    stack.compose("kill", "worker-subflow")  # so the main run waits on its step
    with stack.api() as client:
        automation = client.create_automation(AutomationCore.model_validate(spec))
    try:
        run = stack.start("main-flow/main", steps=["subflow/subflow"])
        (container,) = wait_for("the main run's container", lambda: stack.containers(run.id, running=True), 120)
        # Two: the first may reach the server's triggers before the new automation does (it is
        # loaded through Postgres NOTIFY), and a heartbeat it never saw starts no countdown.
        wait_for("two heartbeats of the main run", lambda: heartbeats(stack, run.id) >= 2, 120)
        step = stack.child(run.id, "subflow")
        with stack.api() as client:  # as its worker had it when the cancel came (a Scheduled one ends at once)
            client.set_flow_run_state(step.id, Pending(), force=True)
            client.set_flow_run_state(step.id, Cancelling(message="cancelled before it started"), force=True)
        stack.compose("kill", "worker-flow")
        stack.sh("docker", "kill", container)
        assert stack.read_run(run.id).state.is_running()
        crashed = stack.wait_final(run.id, timeout=120)
    finally:
        with stack.api() as client:
            client.delete_automation(automation)
        stack.compose("up", "-d", "--wait", "--no-deps", "worker-flow", "worker-subflow")
    assert crashed.state.is_crashed(), crashed.state
    assert f"No heartbeat for {SILENCE} s: the flow run's container is gone" in crashed.state.message
    ended = wait_for("the sweep to end the step", lambda: (s := stack.read_run(step.id).state).is_final() and s, 60)
    assert ended.is_cancelled() and ended.message == "cancelled before it started", ended
    with stack.api() as client:
        assert "RUNNING" not in {state.type.value for state in client.read_flow_run_states(step.id)}
