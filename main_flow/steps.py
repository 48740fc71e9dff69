"""Running the graph (graph.py): each step a child flow run of its deployment, started with
run_deployment() on references once the steps it needs completed, waited for on the server's
event stream, its result checked; a mapped step one child run per partition of its input, their
outputs gathered as one dataset; or, when a cache key is unchanged, an earlier run's result
reused (main_flow/cache.py)."""

import asyncio
import concurrent.futures
import contextvars
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import anyio
import fsspec
from prefect import get_client, get_run_logger
from prefect.client.schemas.objects import TERMINAL_STATES, FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect.deployments import run_deployment
from prefect.events.clients import PrefectEventSubscriber, get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_logger
from prefect.runtime import flow_run
from prefect.states import Cancelled, Cancelling
from prefect.utilities.asyncutils import run_coro_as_sync

from main_flow import cache
from main_flow.plan import PipelineError, partitions
from main_flow.progress import Progress
from stepkit import (
    DATA,
    STEP_RESULT,
    DataRef,
    RunLayout,
    WireMismatch,
    check_wire,
    dataset_of,
    parts_of,
    result_uri,
)  # fmt: skip
from stepkit.graph import INGEST, Graph, Node, dependents

log = get_logger("steps")  # under prefect.*: in a flow run, its records reach the run's log
SAFETY_READ_S = 5.0  # reads of the steps' runs besides the event stream, should an event be lost
FINAL = {state.value for state in TERMINAL_STATES}  # as events label them
RETRIES = 2  # of a step that Crashed, unless its options say otherwise


@dataclass(frozen=True)
class Limits:
    """How long a step may take, and how many partitions of a mapped step run at once."""

    timeout_s: float
    at_once: int


@dataclass(frozen=True, eq=False)  # each task is its own: hashed by identity
class ChildRun:
    """One child run to make: a step, or one partition of a mapped step, on its input."""

    step: str
    inputs: dict[str, DataRef]  # by input name: `data`, or a step's named inputs
    out: str
    partition: int | None = None  # None: the step is not mapped
    of: int = 1
    retries: int = RETRIES

    @property
    def rows(self) -> int:
        return sum(ref["rows"] for ref in self.inputs.values())

    def __str__(self) -> str:
        return self.step if self.partition is None else f"{self.step} partition {self.partition + 1} of {self.of}"


def run_graph(
    graph: Graph,
    data: DataRef,
    layout: RunLayout,
    images: dict[str, str],
    limits: Limits,
    policy: cache.Policy,
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """Run each step of `graph` once every step it needs has completed, on their outputs (the
    ingest's, `data`, where it needs none): independent branches at once. A failed step stops
    only the steps that need it; the others finish and are cached, and the run then fails naming
    every failure. Results by step, in the graph's order."""
    results: dict[str, dict[str, Any]] = {}
    failures: list[Exception] = []
    stopped: set[str] = set()
    # Each step in a thread that carries the flow run's context: its child runs stay this run's children.
    with concurrent.futures.ThreadPoolExecutor(len(graph) or 1) as pool:
        running: dict[concurrent.futures.Future[dict[str, Any]], str] = {}
        while True:
            for name, node in graph.items():
                needs = node.needs.values()
                if name not in {*results, *stopped, *running.values()} and set(needs) <= {INGEST, *results}:
                    inputs = {i: data if n == INGEST else results[n]["output"] for i, n in node.needs.items()}
                    step = contextvars.copy_context().run
                    running[pool.submit(step, run_node, node, inputs, layout, images, limits, policy, progress)] = name
            if not running:
                break
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                try:
                    results[name] = future.result()
                except Exception as exc:  # noqa: BLE001 (named below, with every other failure)
                    failures.append(exc)
                    if after := dependents(graph, name):
                        failures.append(PipelineError(f"steps {after} not started: they need {name}"))
                    stopped |= {name, *after}
    if failures:
        raise PipelineError("; ".join(map(str, failures))) from failures[0]
    return {name: results[name] for name in graph}


def run_node(
    node: Node,
    inputs: dict[str, DataRef],
    layout: RunLayout,
    images: dict[str, str],
    limits: Limits,
    policy: cache.Policy,
    progress: Progress,
) -> dict[str, Any]:
    """Run one step on its inputs (a mapped step as one run per partition of its one input),
    reusing cached results."""
    began, name, option = time.monotonic(), node.step, node.options
    (one, data), retries = next(iter(inputs.items())), option.get("retries", RETRIES)
    mapped = partitions(data, option)  # graph.py maps only a step of one input
    if mapped is None:
        tasks = [ChildRun(name, inputs, layout.step(name), retries=retries)]
    else:
        tasks = [ChildRun(name, {one: d}, layout.step(name, i), i, len(mapped), retries) for i, d in enumerate(mapped)]
    step = deployment(name)
    keyed = images.get(name) or step.job_variables.get("image", "")
    keys = {task: step_key(name, step, task.inputs, keyed, policy.pipeline) for task in tasks}
    hits = {task: entry for task in tasks if (entry := policy.lookup(name, keys[task]))}
    for task, entry in hits.items():
        get_run_logger().info("step %s: cached from run %s, not started", task, entry["run"])
    progress.update(name, partitions=len(tasks), cached=len(hits) == len(tasks), rows=sum(t.rows for t in tasks),
                    image=keyed)  # fmt: skip
    progress.publish()
    results = {task: {**entry["result"], "cached_from": entry["run"]} for task, entry in hits.items()}

    def record(task: ChildRun, result: dict[str, Any]) -> None:
        # A deploy between the run's creation and its container's start changes the image it runs:
        # its result is then not the key's, and caching it would serve it for the older image.
        if result.get("image") == keyed:
            policy.record(name, keys[task], result)
        else:
            get_run_logger().warning("step %s ran %s, not %s: not cached", task, result.get("image"), keyed)

    results |= run_tasks([task for task in tasks if task not in hits], images, limits, record)
    return gathered(name, tasks, results, began)


def gathered(name: str, tasks: list[ChildRun], results: dict[ChildRun, dict[str, Any]], began: float) -> dict[str, Any]:
    """A step's result: its own, or a mapped step's partitions' outputs as one dataset of their parts."""
    if tasks[0].partition is None:
        return results[tasks[0]]
    done = [results[task] for task in tasks]
    result: dict[str, Any] = {
        "output": dataset_of([r["output"] for r in done]),
        "summary": [
            {
                "partition": t.partition + 1,
                "rows": t.rows,
                "run": r.get("cached_from") or r["flow_run_id"],
                "cached": "cached_from" in r,
            }
            for t, r in zip(tasks, done, strict=True)
        ],  # fmt: skip
        "report": "\n\n".join(
            f"#### Partition {t.partition + 1} of {t.of}\n\n{r['report']}" for t, r in zip(tasks, done, strict=True)
        ),
        "image": done[0]["image"],
        "partitions": done,
        "seconds": round(time.monotonic() - began, 3),  # wall time, from the step's start to its end
    }
    if all("cached_from" in r for r in done):
        result["cached_from"] = done[0]["cached_from"]
    return result


def run_tasks(
    tasks: list[ChildRun], images: dict[str, str], limits: Limits, record: Callable[[ChildRun, dict[str, Any]], None]
) -> dict[ChildRun, dict[str, Any]]:
    """Start the tasks' child runs, at most `limits.at_once` partitions of a step at a time, and
    wait for all; `record` each completed result at once. A run that Crashed starts again, up to
    its task's `retries`. After a failure no more partitions are started; those running finish
    (and are recorded, so a re-run computes only what failed)."""
    deadline = time.monotonic() + limits.timeout_s
    queue, running, results, failed = list(tasks), {}, {}, []
    attempts = dict.fromkeys(tasks, 0)

    def ready() -> ChildRun | None:
        """The first queued task whose step has fewer than `at_once` runs going."""
        busy = [t.step for t in running.values()]
        return next((t for t in queue if busy.count(t.step) < limits.at_once), None)

    while queue or running:
        while not failed and (task := ready()):
            queue.remove(task)
            attempts[task] += 1
            running[start_step(task, attempts[task], images.get(task.step)).id] = task
        if not running:
            break
        for run in run_coro_as_sync(until_final(list(running), deadline, any_final=True)):
            if not final(run):
                continue
            task = running.pop(run.id)
            ended = f"step {task} (run {run.name!r}) ended {run.state.name}: {run.state.message}"
            if run.state.is_completed():
                results[task] = step_result(task, run)
                record(task, results[task])
            elif run.state.is_crashed() and attempts[task] <= task.retries and not failed:
                get_run_logger().warning("%s; attempt %d of %d starts", ended, attempts[task] + 1, task.retries + 1)
                queue.insert(0, task)
            else:
                tries = f" (attempt {attempts[task]} of {task.retries + 1})" if attempts[task] > 1 else ""
                failed.append(ended + tries)
        if running and time.monotonic() >= deadline:
            waiting = [run for run in run_coro_as_sync(until_final(list(running), deadline)) if not final(run)]
            with get_client(sync_client=True) as client:
                for run in waiting:
                    cancel(client, run, f"main flow stopped waiting after {limits.timeout_s}s")
            raise PipelineError("; ".join(failed + [not_finished(run, limits.timeout_s) for run in waiting]))
    if failed:
        skipped = f"; {len(queue)} partition(s) not started" if queue else ""
        raise PipelineError("; ".join(failed) + skipped)
    return results


def deployment(name: str) -> DeploymentResponse:
    """Step `name`'s deployment, as the server has it now."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound as exc:
            raise PipelineError(
                f"deployment {name!r} not found: register it with `prefect deploy --name {name.split('/')[1]}`"
            ) from exc


def step_key(
    name: str, step: DeploymentResponse, inputs: dict[str, DataRef], image: str, pipeline: str | None
) -> str | None:
    """The cache key of step `name` on `inputs` in `pipeline`: the image it runs (its
    deployment's, or one a replay pins) and its deployment's parameters."""
    hashes = [ref["sha256"] if i == DATA else f"{i}:{ref['sha256']}" for i, ref in sorted(inputs.items())]
    return cache.key(name, image, step.parameters, hashes, pipeline)


def start_step(task: ChildRun, attempt: int, image: str | None) -> FlowRun:
    """Create the child run of one step's `attempt`; `image` pins its image (a replay)."""
    return run_deployment(
        task.step,
        parameters={**task.inputs, "out": task.out},
        timeout=0,  # return at once: until_final waits for the step's runs
        job_variables={"image": image} if image else None,
        tags=[f"attempt-{attempt}"] if attempt > 1 else None,
        # Should the server answer the create only after it restarts, the client's retry gets
        # the same run, not a second one.
        idempotency_key=f"{flow_run.id}/{task.out}/{attempt}",
    )


async def until_final(ids: list[UUID], deadline: float, any_final: bool = False) -> list[FlowRun]:
    """Read the runs whenever the server's event stream reports a state of one of them (and every
    few seconds besides) until all (or, with `any_final`, any) are final or the deadline passes:
    no polling interval to wait out.
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
                if (any if any_final else all)(final(run) for run in runs) or left <= 0:
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


def step_result(task: ChildRun, run: FlowRun) -> dict[str, Any]:
    """A finished step's result: what it stored in its own output directory, checked against the
    contract; its image is the one its worker ran (the run's `image:` tag), whatever it says."""
    uri = result_uri(task.out)
    try:
        with fsspec.open(uri, "rb") as file:
            result = json.loads(file.read())
    except FileNotFoundError:
        raise PipelineError(
            f"step {task} (run {run.name!r}) completed but stored no result at {uri}: "
            "was it built with an older step kit? Redeploy it with the current stepkit"
        ) from None
    wrong = (
        [k for k, kind in STEP_RESULT.items() if not isinstance(result.get(k), kind)]
        if isinstance(result, dict)
        else ["all"]
    )
    if wrong:
        raise PipelineError(f"step {task} returned a result that lacks or mistypes {wrong}: {str(result)[:300]}")
    try:
        check_wire(result["output"], "the main flow")
    except WireMismatch as exc:
        raise PipelineError(f"step {task} (run {run.name!r}): {exc}") from exc
    inputs = {part["uri"] for ref in task.inputs.values() for part in parts_of(ref)}
    for part in parts_of(result["output"]):  # its own output, or its input passed on: nothing else
        if part["uri"] not in inputs and not part["uri"].startswith(f"{task.out.rstrip('/')}/"):
            raise PipelineError(f"step {task} (run {run.name!r}) returned {part['uri']}, outside its output directory")
    image = next((tag.removeprefix("image:") for tag in run.tags if tag.startswith("image:")), "unknown")
    return {**result, "image": image, "flow_run_id": str(run.id)}
