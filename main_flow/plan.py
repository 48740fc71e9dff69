"""The pipeline's plan: its steps as `prefect deploy` registered them or as a run passes them,
their groups (one after another) and options, and a mapped step's partitions of its input."""

from prefect import get_run_logger
from prefect.logging import get_logger
from prefect.variables import Variable

from stepkit import PIPELINE_STEPS, DataRef, Step, StepOptions, Steps, dataset_of, parts_of

log = get_logger("plan")  # under prefect.*: in a flow run, its records reach the run's log


class PipelineError(RuntimeError):
    """A step did not deliver a usable result."""


def registered_steps() -> Steps:
    """The pipeline's steps as the last `prefect deploy` registered them (tools/deploy/steps.py)."""
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


def step_options(steps: Steps) -> dict[str, StepOptions]:
    """Each step's options by name (`{}` for a bare name); refuse a step mapped two ways."""
    flat = [s for step in steps for s in (step if isinstance(step, list) else [step])]
    options = {name_of(s): s if isinstance(s, dict) else StepOptions(step=s) for s in flat}
    if both := sorted(n for n, o in options.items() if "partitions" in o and "rows_per_partition" in o):
        raise ValueError(f"steps {both}: give partitions or rows_per_partition, not both")
    return options


def name_of(step: Step) -> str:
    return step["step"] if isinstance(step, dict) else step


def uncached(options: dict[str, StepOptions]) -> frozenset[str]:
    """The steps declared with `cache: false`."""
    return frozenset(name for name, o in options.items() if o.get("cache") is False)


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
