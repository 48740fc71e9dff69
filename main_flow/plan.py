"""The pipeline's plan: its steps as `prefect deploy` registered them or as a run passes them
(stepkit/graph.py makes them a graph), and a mapped step's partitions of its input."""

from prefect import get_run_logger
from prefect.logging import get_logger
from prefect.runtime import deployment
from prefect.variables import Variable

from stepkit import DataRef, StepOptions, Steps, dataset_of, parts_of, steps_variable

log = get_logger("plan")  # under prefect.*: in a flow run, its records reach the run's log


class PipelineError(RuntimeError):
    """A step did not deliver a usable result."""


def registered_steps() -> Steps:
    """The steps of this run's pipeline, the one named after its deployment, as the last `prefect
    deploy` registered them (tools/deploy/steps.py)."""
    pipeline = deployment.name
    name = steps_variable(pipeline or "?")
    steps = Variable.get(name) if pipeline else None
    if steps is None:
        raise PipelineError(
            f"no pipeline {pipeline!r} registered (Variable {name!r} is missing): run `prefect deploy --all`, "
            "or pass `steps`"
        )
    get_run_logger().info("steps of pipeline %s, as last deployed: %s", pipeline, steps)
    return steps


def partitions(data: DataRef, option: StepOptions) -> list[DataRef] | None:
    """`data`'s parts in contiguous groups of about equal rows, one per partition of a mapped
    step; None if the step is not mapped. A part is never split: at most one partition per part."""
    if "partitions" in option:
        wanted = option["partitions"]
    elif "rows_per_partition" in option:
        wanted = -(-data["rows"] // option["rows_per_partition"])
    else:
        return None
    parts = parts_of(data)
    count = max(1, min(wanted, len(parts)))
    if count < wanted:
        log.warning(
            "step %s: %d partitions asked, but the input has %d part(s); lower part_rows for more",
            option["step"], wanted, len(parts),
        )  # fmt: skip
    groups: list[list[DataRef]] = [[] for _ in range(count)]
    start, total = 0, max(data["rows"], 1)
    for part in parts:
        groups[min(count - 1, start * count // total)].append(part)
        start += part["rows"]
    return [dataset_of(group) for group in groups if group]
