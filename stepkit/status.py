"""The live view of a pipeline run: each step with its state, attempt, partitions done out of total,
rows, seconds and whether it was reused from the cache.

The main flow publishes its plan as the Variable `pipeline-status-<main run id>` (the steps in
order, how many partitions each has, which are cached); the step runs say the rest. `make status`
(tools/status.py) draws it while the run goes on, and the main run's artifact shows it at the end.
"""

from collections.abc import Iterable
from typing import Any, NotRequired

from typing_extensions import TypedDict

PREFIX, TAG = "pipeline-status-", "pipeline-status"  # the Variable's name (and its run's id), its tag
COLUMNS = ("step", "state", "attempt", "partitions", "rows", "seconds", "cached")


class Planned(TypedDict):
    """A step as the main flow plans it (the ingest, its own, with its state and seconds)."""

    step: str
    partitions: NotRequired[int]  # known once the step's group starts
    cached: NotRequired[bool]
    rows: NotRequired[int]  # its input's
    state: NotRequired[str]
    seconds: NotRequired[float]
    image: NotRequired[str]  # what it runs, by digest


class Row(TypedDict):
    step: str
    state: str
    attempt: int
    done: int
    partitions: int
    rows: int | None
    seconds: float | None
    cached: bool


def variable(main_run_id: Any) -> str:
    return f"{PREFIX}{main_run_id}"


def rows(plan: list[Planned], runs: Iterable[dict[str, Any]], now: float) -> list[Row]:
    """A row per planned step from its step runs (dicts: step, partition, attempt, state, start,
    end, as epoch seconds): the latest attempt of each partition counts."""
    by_step: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        partitions = by_step.setdefault(run["step"], {})
        latest = partitions.get(run["partition"])
        if latest is None or run["attempt"] > latest["attempt"]:
            partitions[run["partition"]] = run
    table = []
    for step in plan:
        latest = list(by_step.get(step["step"], {}).values())
        starts = [r["start"] for r in latest if r["start"] is not None]
        ends = [r["end"] if r["end"] is not None else now for r in latest if r["start"] is not None]
        partitions, cached = step.get("partitions", max(len(latest), 1)), bool(step.get("cached"))
        state = step.get("state") or ("Cached" if cached else state_of([r["state"] for r in latest]))
        seconds = step.get("seconds", round(max(ends) - min(starts), 1) if starts else None)
        table.append(
            Row(
                step=step["step"],
                state=state,
                attempt=max((r["attempt"] for r in latest), default=0),
                done=partitions if cached or state == "Completed" else sum(r["state"] == "Completed" for r in latest),
                partitions=partitions,
                rows=step.get("rows"),
                seconds=seconds,
                cached=cached,
            )
        )
    return table


def step_run(run: Any, step: str) -> dict[str, Any]:
    """What the view needs of a step run (a Prefect FlowRun) of `step`."""
    out = str((run.parameters or {}).get("out", ""))
    tail = out.rstrip("/").rsplit("/", 1)[-1]
    attempts = [int(tag.removeprefix("attempt-")) for tag in run.tags if tag.startswith("attempt-")]
    return {
        "step": step,
        "partition": int(tail.removeprefix("part-")) if tail.startswith("part-") else 0,
        "attempt": max(attempts, default=1),
        "state": run.state_type.value.title() if run.state_type else "Scheduled",
        "start": run.start_time.timestamp() if run.start_time else None,
        "end": run.end_time.timestamp() if run.end_time else None,
    }


def state_of(states: list[str]) -> str:
    """A step's state from its partitions': the first failure, else what is still going, else done."""
    for name in ("Crashed", "Failed", "Cancelled", "Cancelling", "Running", "Pending", "Scheduled"):
        if name in states:
            return name
    return "Completed" if states else "Waiting"


def cells(row: Row) -> list[str]:
    return [
        row["step"],
        row["state"],
        str(row["attempt"] or "-"),
        f"{row['done']}/{row['partitions']}",
        "-" if row["rows"] is None else f"{row['rows']:,}",
        "-" if row["seconds"] is None else f"{row['seconds']:.1f}",
        "yes" if row["cached"] else "no",
    ]


def markdown(table: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cells(row)) + " |" for row in table])


def text(table: list[Row]) -> list[str]:
    """Plain, aligned lines: a header, then a line per step."""
    grid = [list(COLUMNS), *(cells(row) for row in table)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in grid]


def mermaid(table: list[Row], plan: list[Planned], needs: dict[str, dict[str, str]]) -> str:
    """The run's graph as a Mermaid chart: each step with its state, cached or not, rows, seconds
    and image digest; each edge from the step whose output it carries, named if the input is."""
    ids = {row["step"]: f"s{i}" for i, row in enumerate(table)}
    images = {step["step"]: step.get("image", "") for step in plan}
    lines = ["```mermaid", "graph LR"]
    for row in table:
        _, state, _, _, rows, seconds, cached = cells(row)
        digest = images[row["step"]].partition("@")[2][:19]  # sha256: and 12 hex digits
        facts = [f"{state}, cached" if cached == "yes" and state != "Cached" else state, digest]
        facts[1:1] = [f"{rows} rows"] * (rows != "-") + [f"{seconds} s"] * (seconds != "-")
        lines.append(f'  {ids[row["step"]]}["{row["step"]}<br/>{"<br/>".join(f for f in facts if f)}"]')
    for step, inputs in needs.items():
        lines += [f"  {ids[n]} -->{'' if i == 'data' else f'|{i}|'} {ids[step]}" for i, n in inputs.items()]
    return "\n".join([*lines, "```"])
