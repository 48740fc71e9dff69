"""Step orchestration: each step a child flow run of its deployment, started with
run_deployment() on a reference, waited for on the server's event stream, its result checked;
or, when its cache key is unchanged, an earlier run's result reused (main_flow/cache.py)."""

import asyncio
import time
from typing import Any
from uuid import UUID

import anyio
from prefect import get_client, get_run_logger
from prefect.client.schemas.objects import TERMINAL_STATES, FlowRun
from prefect.deployments import run_deployment
from prefect.events.clients import PrefectEventSubscriber, get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.variables import Variable

from main_flow import cache
from stepkit import PIPELINE_STEPS, STEP_RESULT, DataRef, RunLayout, Step, Steps, WireMismatch, check_wire

SAFETY_READ_S = 5.0  # reads of the steps' runs besides the event stream, should an event be lost
FINAL = {state.value for state in TERMINAL_STATES}  # as events label them


class PipelineError(RuntimeError):
    """A step did not deliver a usable result."""


def registered_steps() -> Steps:
    """The pipeline's steps as the last `prefect deploy` registered them (tools/pipeline.py)."""
    steps = Variable.get(PIPELINE_STEPS)
    if steps is None:
        raise PipelineError(
            f"no pipeline registered (Variable {PIPELINE_STEPS!r} is missing): run `prefect deploy --all`, "
            "or pass `steps`"
        )
    get_run_logger().info("steps, as last deployed: %s", steps)
    return steps


def step_groups(steps: Steps) -> list[list[str]]:
    """The steps' names as groups that run one after another; refuse a step listed twice."""
    groups = [[name_of(s) for s in step] if isinstance(step, list) else [name_of(step)] for step in steps]
    names = [name for group in groups for name in group]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated or any(not group for group in groups):
        raise ValueError(f"invalid steps {steps}: each step once, no empty groups (repeated: {repeated})")
    return groups


def name_of(step: Step) -> str:
    return step["step"] if isinstance(step, dict) else step


def uncached(steps: Steps) -> frozenset[str]:
    """The steps declared with `cache: false`."""
    flat = [s for step in steps for s in (step if isinstance(step, list) else [step])]
    return frozenset(s["step"] for s in flat if isinstance(s, dict) and s.get("cache") is False)


def run_group(
    group: list[str],
    data: DataRef,
    layout: RunLayout,
    images: dict[str, str],
    timeout_s: float,
    policy: cache.Policy,
) -> dict[str, dict[str, Any]]:
    """Run the steps of a group at once on `data`, reusing cached results; results by deployment name."""
    keys = {name: step_key(name, data, images.get(name)) for name in group}
    hits = {name: entry for name in group if (entry := policy.lookup(name, keys[name]))}
    for name, entry in hits.items():
        get_run_logger().info("step %s: cached from run %s, not started", name, entry["run"])
    started = {name: start_step(name, data, layout.step(name), images.get(name)) for name in group if name not in hits}
    finished = wait_for_runs(started, timeout_s) if started else {}
    results = {name: step_result(name, run) for name, run in finished.items() if run.state.is_completed()}
    for name, result in results.items():
        policy.record(name, keys[name], result)  # also when a step beside it failed: a resume reuses it
    failed = [
        f"step {name} (run {run.name!r}) ended {run.state.name}: {run.state.message}"
        for name, run in finished.items()
        if not run.state.is_completed()
    ]
    if failed:
        raise PipelineError("; ".join(failed))
    reused = {name: {**entry["result"], "cached_from": entry["run"]} for name, entry in hits.items()}
    return {name: reused.get(name) or results[name] for name in group}


def step_key(name: str, data: DataRef, image: str | None) -> str | None:
    """The cache key of step `name` on `data`: its image digest (`image` pins one: a replay) and
    its deployment's parameters, as the server has them now."""
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound as exc:
            raise PipelineError(
                f"deployment {name!r} not found: register it with `prefect deploy --name {name.split('/')[1]}`"
            ) from exc
    image = image or deployment.job_variables.get("image", "")
    return cache.key(name, image, deployment.parameters, [data["sha256"]])


def start_step(name: str, data: DataRef, out: str, image: str | None) -> FlowRun:
    """Create the child run of one step; `image` pins its image (a replay)."""
    return run_deployment(
        name,
        parameters={"data": data, "out": out},
        timeout=0,  # return at once: wait_for_runs waits for the whole group
        job_variables={"image": image} if image else None,
    )


def wait_for_runs(runs: dict[str, FlowRun], timeout_s: float) -> dict[str, FlowRun]:
    """Wait until every run is final; cancel the rest and fail at the deadline."""
    names = {run.id: name for name, run in runs.items()}
    finished = run_coro_as_sync(until_final(list(names), time.monotonic() + timeout_s))
    waiting = [run for run in finished if not final(run)]
    if waiting:
        with get_client(sync_client=True) as client:
            for run in waiting:
                cancel(client, run, f"main flow stopped waiting after {timeout_s}s")
        raise PipelineError("; ".join(not_finished(run, timeout_s) for run in waiting))
    return {names[run.id]: run for run in finished}


async def until_final(ids: list[UUID], deadline: float) -> list[FlowRun]:
    """Read the runs whenever the server's event stream reports a state of one of them (and every
    few seconds besides) until all are final or the deadline passes: no polling interval to wait out.
    While the stream is away (the server restarting), read every few seconds and reconnect."""
    states = EventFilter(
        event=EventNameFilter(prefix=["prefect.flow-run."]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}" for run_id in ids]),
    )
    events: PrefectEventSubscriber | None = None
    async with get_client() as client:
        try:
            soon = False
            while True:
                runs = await asyncio.gather(*(client.read_flow_run(run_id) for run_id in ids))
                left = deadline - time.monotonic()
                if all(final(run) for run in runs) or left <= 0:
                    return runs
                events = events or await subscribe(states)
                with anyio.move_on_after(0.1 if soon else min(SAFETY_READ_S, left)):
                    soon = False
                    if events is None:
                        await anyio.sleep_forever()  # until the next read
                    else:
                        try:
                            event = await anext(events)
                        except Exception:  # e.g. the gateway's 502 while the server restarts: not retried by Prefect
                            await events.__aexit__(None, None, None)
                            events = None
                            continue
                        # A final state's event can come before reads show it: then read again soon.
                        soon = event.resource.get("prefect.state-type") in FINAL
        finally:
            if events is not None:
                await events.__aexit__(None, None, None)


async def subscribe(states: EventFilter) -> PrefectEventSubscriber | None:
    """A connected subscriber to the server's events, or None while the stream is unavailable."""
    subscriber = get_events_subscriber(filter=states)
    try:
        return await subscriber.__aenter__()
    except Exception:
        return None


def not_finished(run: FlowRun, timeout_s: float) -> str:
    state = run.state.name if run.state else "unknown"
    return (
        f"step run {run.name!r} did not finish within {timeout_s}s (state {state}); it was cancelled. "
        f"Check that a worker is polling work pool {run.work_pool_name!r}."
    )


def final(run: FlowRun) -> bool:
    return run.state is not None and run.state.is_final()


def cancel(client: Any, run: FlowRun, reason: str) -> None:
    """Cancel a child run that will not be waited for: never leave it queued forever."""
    started = run.state is not None and run.state.is_running()
    # A run that has not started is cancelled outright; a running one through its worker.
    state = Cancelling(message=reason) if started else Cancelled(message=reason)
    client.set_flow_run_state(run.id, state, force=True)


def step_result(name: str, run: FlowRun) -> dict[str, Any]:
    """A finished step's result, checked against the contract."""
    result = run.state.result()
    wrong = [k for k, kind in STEP_RESULT.items() if not isinstance(result.get(k), kind)]
    if wrong:
        raise PipelineError(f"step {name} returned a result that lacks or mistypes {wrong}: {str(result)[:300]}")
    try:
        check_wire(result["output"], "the main flow")
    except WireMismatch as exc:
        raise PipelineError(f"step {name} (run {run.name!r}): {exc}") from exc
    return {**result, "flow_run_id": str(run.id)}


def run_steps(
    groups: list[list[str]],
    data: DataRef,
    layout: RunLayout,
    images: dict[str, str],
    timeout_s: float,
    policy: cache.Policy,
) -> dict[str, dict[str, Any]]:
    """Run the groups one after another, each on the previous group's first output."""
    results: dict[str, dict[str, Any]] = {}
    for group in groups:
        done = run_group(group, data, layout, images, timeout_s, policy)
        results.update(done)
        data = done[group[0]]["output"]  # after a parallel group, its first step's output
    return results
