"""Operating pipelines on real Docker (README's *Operating pipelines*): a cancel stops every step
and container, a main run killed mid-step leaves no step running. The reaper's decisions are unit
tests (worker/test_pipeline_worker.py); a component that cannot be imported is the README test's."""

import json

import pytest

from conftest import iris_rows, to_csv
from tests.harness import PREFECT, wait_for

pytestmark = pytest.mark.e2e


def fresh_source(serve, name: str, turn: int) -> str:
    """The iris rows, turned by `turn`: an input no earlier run has cached."""
    rows = iris_rows()
    return serve(name, to_csv(rows[turn:] + rows[:turn]))


def test_a_cancel_stops_every_step_and_its_container(stack, serve):
    """`prefect flow-run cancel` (what the UI's button and make cancel do) while validate runs in 30
    partitions, two at a time: the main run ends Cancelled naming the step runs it stopped; none
    is left running or starts later, and no container is left."""
    steps = [{"step": "validate/validate", "rows_per_partition": 5}, "subflow/subflow"]
    source = fresh_source(serve, "cancel.csv", 7)
    run = stack.start("main-flow/main", source=source, steps=steps, part_rows=5, partitions_at_once=2)
    wait_for("a validate partition running", lambda: stack.running_steps(run.id, "validate"), 180)
    stack.sh(PREFECT, "flow-run", "cancel", str(run.id))
    ended = stack.wait_final(run.id, timeout=120)
    assert ended.state.is_cancelled(), ended.state
    children = stack.children(run.id)
    stack.wait_stopped(run.id)
    states = {c.name: stack.read_run(c.id).state for c in children}
    stopped = [name for name, state in states.items() if state.is_cancelled()]
    assert stopped and {s.type.value for s in states.values()} <= {"COMPLETED", "CANCELLED"}, states
    assert all(f"(run {name!r})" in ended.state.message for name in stopped), ended.state.message
    assert len(children) < 30 and not stack.exists(stack.layout(run.id).output)
    # The cache records a step run only once it completed: of this run, its ingest and the
    # partitions done before the cancel, never a cancelled one.
    cache = f"{stack.data_url()}/cache".removeprefix("file://")
    entries = stack.on_data_volume("grep", "-rlF", f'"run": "{run.id}"', cache, check=False).stdout.split()
    recorded = [json.loads(stack.read_object(f"file://{e}")) for e in entries]
    completed = {str(c.id) for c in children if states[c.name].is_completed()}
    assert [e["step"] for e in recorded].count("ingest") == 1, recorded
    steps_recorded = {e["result"]["flow_run_id"] for e in recorded if e["step"] != "ingest"}
    assert steps_recorded <= completed, (steps_recorded, states)


def test_a_main_container_killed_mid_step_leaves_no_step_running(stack, serve):
    """A killed container runs no `finally`: the worker that watched it cancels its step, here one
    held paused so that only the reaper can end it."""
    run = stack.start("main-flow/main", source=fresh_source(serve, "killed.csv", 11))
    step = stack.child(run.id, "validate")
    (held,) = wait_for("the step's container", lambda: stack.containers(step.id, running=True), 120, every=0.1)
    stack.sh("docker", "pause", held)
    try:
        (main,) = stack.containers(run.id, running=True)
        stack.sh("docker", "kill", main)
        reaped = ("CANCELLING", "CANCELLED")
        wait_for("the reaper to cancel the step", lambda: stack.read_run(step.id).state.type.value in reaped, 60)
    finally:
        stack.sh("docker", "unpause", held, check=False)
    ended = stack.wait_final(run.id)
    assert ended.state.is_crashed() and "Killed (SIGKILL), not for memory" in ended.state.message, ended.state
    stack.wait_stopped(run.id)
    assert [c.id for c in stack.children(run.id)] == [step.id]
    cancelled = stack.read_run(step.id).state
    assert cancelled.is_cancelled() and "its pipeline's main run" in cancelled.message, cancelled


def test_a_step_cancelled_alone_stops_its_container_and_fails_its_pipeline_by_name(stack, serve):
    """Held paused, the step can end only by the cancel."""
    run = stack.start("main-flow/main", source=fresh_source(serve, "step-cancelled.csv", 13))
    step = stack.child(run.id, "validate")
    (held,) = wait_for("the step's container", lambda: stack.containers(step.id, running=True), 120, every=0.1)
    stack.sh("docker", "pause", held)
    stack.sh(PREFECT, "flow-run", "cancel", str(step.id))
    ended = stack.wait_final(run.id)
    assert ended.state.is_failed(), ended.state
    assert f"step validate/validate (run {step.name!r}) ended Cancelled" in ended.state.message, ended.state.message
    stack.wait_stopped(run.id)
    assert stack.read_run(step.id).state.is_cancelled()
