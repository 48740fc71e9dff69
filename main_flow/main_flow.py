"""Main flow: load a source (CSV, compressed CSV or Parquet) into the data store as Parquet, run
the pipeline's steps on it by reference, and store the pipeline output next to it. Unchanged work
is reused (main_flow/cache.py)."""

import json
import time
from typing import Annotated, Any
from uuid import UUID

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import ObjectNotFound
from prefect.runtime import deployment, flow_run
from pydantic import Field

# Package imports: Prefect loads this file as module `main_flow` with this directory on its path.
from main_flow import cache
from main_flow.bounds import BOUNDS
from main_flow.ingest import ingest
from main_flow.plan import registered_steps
from main_flow.progress import Progress
from main_flow.sources import Settings, identity
from main_flow.steps import Limits, run_graph
from stepkit import (
    DataRef,
    RunLayout,
    StepName,
    Steps,
    atomic_write,
    component_image,
    parts_of,
    redact,
    signature,
    usage,
    verify,
)  # fmt: skip
from stepkit.graph import graph_of, order, uncached
from stepkit.layout import confined, runs_root

# What determines a run's results: what `resume_from` takes from the run it resumes. Limits and
# timeouts come from the resuming call, so a run that timed out can be resumed with more time.
RESUMED = ("source", "steps", "data", "images", "max_columns", "part_rows")


@flow(name="main-flow")
def main_flow(
    source: Annotated[str, Field(min_length=1)] = "iris.csv",
    steps: Steps | None = None,
    data: DataRef | None = None,
    images: dict[StepName, str] | None = None,
    refresh: cache.Refresh = [],  # noqa: B006 (Prefect validates a copy of every parameter)
    resume_from: UUID | None = None,
    max_bytes: Annotated[int, Field(ge=1, le=BOUNDS.max_source_bytes)] = 4 << 30,
    max_columns: Annotated[int, Field(ge=1, le=BOUNDS.max_source_columns)] = 1000,
    part_rows: Annotated[int, Field(ge=1)] = 1_000_000,
    partitions_at_once: Annotated[int, Field(ge=1, le=BOUNDS.max_partitions_at_once)] = 8,
    fetch_timeout_s: Annotated[float, Field(ge=1, le=BOUNDS.max_timeout_seconds)] = 1800.0,
    step_timeout_s: Annotated[float, Field(ge=1, le=BOUNDS.max_timeout_seconds)] = 1800.0,
) -> dict[str, Any]:
    """Load `source` into the store in parts of `part_rows` rows and run `steps` (by default the
    pipeline's, as last deployed) on it, a mapped step's partitions at most `partitions_at_once`
    at a time, reusing cached steps unless in `refresh`; `data` and `images` replay a past run;
    `resume_from` runs a past run's parameters again, reusing what it completed."""
    image = component_image()
    if resume_from is not None:
        past = resumed(resume_from)
        source, steps, data = past.get("source", source), past.get("steps", steps), past.get("data", data)
        images, max_columns = past.get("images", images), past.get("max_columns", max_columns)
        part_rows = past.get("part_rows", part_rows)
    registry = image.split("/", 1)[0]
    if foreign := sorted(i for i in (images or {}).values() if not i.startswith(f"{registry}/")):
        raise ValueError(f"images {foreign} are not of this platform's registry {registry}")
    steps = steps if steps is not None else registered_steps()
    graph = graph_of(steps)
    order(graph)  # a cycle is refused before anything runs
    layout = RunLayout.of(flow_run.id)
    refresh = cache.checked(refresh, set(graph))
    resuming = str(resume_from) if resume_from else None
    policy = cache.Policy(str(flow_run.id), refresh, uncached(graph), resuming, pipeline=deployment.name)
    with Progress(flow_run.id, {name: node.needs for name, node in graph.items()}) as progress:
        data, cached = input_of(source, data, image, policy, layout, progress, max_bytes, max_columns, part_rows,
                                fetch_timeout_s)  # fmt: skip
        limits = Limits(step_timeout_s, partitions_at_once)
        results = run_graph(graph, data, layout, images or {}, limits, policy, progress)
        cached |= {name: result["cached_from"] for name, result in results.items() if "cached_from" in result}
        output = {
            "main_flow_run_id": str(flow_run.id),
            "pipeline": policy.pipeline,  # its deployment's name; None for a run not of a deployment
            "main_image": image,
            "source": redact(source),
            "steps": steps,
            "graph": {name: node.needs for name, node in graph.items()},  # input -> the step it reads
            "input": data,
            "results": results,
            "cached": cached,
            "output_uri": layout.output,
            **usage(),
        }
        output = signature.signed(output)  # replays and `make output` trust only what a main flow wrote
        with atomic_write(layout.output) as file:
            file.write(json.dumps(output, indent=2).encode())
        reports = [
            f"*{name}: cached from run {r['cached_from']}*\n\n{r['report']}" if "cached_from" in r else r["report"]
            for name, r in results.items()
        ]
        create_markdown_artifact(
            key="pipeline-output",
            markdown="\n\n".join([f"Output: `{layout.output}`"] + reports),
            description=f"Pipeline output for {redact(source)}",
        )
    return output


def input_of(
    source: str,
    data: DataRef | None,
    image: str,
    policy: cache.Policy,
    layout: RunLayout,
    progress: Progress,
    max_bytes: int,
    max_columns: int,
    part_rows: int,
    fetch_timeout_s: float,
) -> tuple[DataRef, dict[str, str]]:
    """The run's input: a replay's, checked; else the ingest's, reused from the cache where its key
    is unchanged; and {"ingest": run} if it was."""
    started, cached = time.monotonic(), {}
    if data is None:
        settings = Settings()
        found = identity(source, settings, fetch_timeout_s)
        own = {"source": found, "max_columns": max_columns, "part_rows": part_rows}
        key = cache.key(cache.INGEST, image, own, [], policy.pipeline) if found else None
        if entry := policy.lookup(cache.INGEST, key):
            data, cached[cache.INGEST] = entry["result"]["output"], entry["run"]
        else:
            data = ingest(source, layout.input, settings, max_bytes, fetch_timeout_s, max_columns, part_rows)
            policy.record(cache.INGEST, key, {"output": data})
    else:
        for part in parts_of(data):
            confined(part["uri"], runs_root())  # a replay reads only what a run stored
        verify(data)  # a replay: fail here, before any step runs, if the input is gone
    get_run_logger().info(
        "input: %d rows, %d bytes in %d part(s) at %s%s",
        data["rows"], data["bytes"], len(data.get("parts", [data])), data["uri"],
        f" (cached from run {cached[cache.INGEST]})" if cached else "",
    )  # fmt: skip
    seconds = round(time.monotonic() - started, 1)
    progress.update(cache.INGEST, state="Cached" if cached else "Completed", rows=data["rows"], seconds=seconds,
                    cached=bool(cached), partitions=1, image=image)  # fmt: skip
    progress.publish()
    return data, cached


def resumed(run_id: UUID) -> dict[str, Any]:
    """The parameters of the ended main run `run_id` that determine its results (RESUMED)."""
    with get_client(sync_client=True) as client:
        try:
            past = client.read_flow_run(run_id)
        except ObjectNotFound:
            raise ValueError(f"resume_from {run_id}: no such flow run") from None
        current = client.read_flow_run(flow_run.id)
        if past.flow_id != current.flow_id:
            raise ValueError(f"resume_from {run_id}: run {past.name!r} is not a main-flow run")
        if past.deployment_id != current.deployment_id:  # its steps and its cache are its pipeline's
            theirs = client.read_deployment(past.deployment_id).name if past.deployment_id else None
            raise ValueError(
                f"resume_from {run_id}: run {past.name!r} is of pipeline {theirs!r}, not {deployment.name!r}: "
                f"make resume RUN={run_id} PIPELINE={theirs}"
            )
    if past.state is None or not past.state.is_final():
        state = past.state.name if past.state else "not started"
        raise ValueError(f"resume_from {run_id}: run {past.name!r} is still {state}; resume a run that has ended")
    get_run_logger().info("resuming run %s (%s, %s)", past.name, run_id, past.state.name)
    return {name: past.parameters[name] for name in RESUMED if name in past.parameters}
