"""Main flow: load a CSV into the data store as Parquet, run the pipeline's steps on it by
reference, and store the pipeline output next to it."""

import json
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import Field

# Package imports: Prefect loads this file as module `main_flow` with this directory on its path.
from main_flow.ingest import Settings, ingest
from main_flow.steps import registered_steps, run_steps, step_groups
from stepkit import DataRef, RunLayout, StepName, Steps, atomic_write, redact, tag_run_with_image, usage, verify
from stepkit.layout import confined, runs_root


@flow(name="main-flow")
def main_flow(
    source: Annotated[str, Field(min_length=1)] = "iris.csv",
    steps: Steps | None = None,
    data: DataRef | None = None,
    images: dict[StepName, str] | None = None,
    max_bytes: Annotated[int, Field(ge=1)] = 4 << 30,
    max_columns: Annotated[int, Field(ge=1)] = 1000,
    fetch_timeout_s: Annotated[float, Field(ge=1)] = 1800.0,
    step_timeout_s: Annotated[float, Field(ge=1)] = 1800.0,
) -> dict[str, Any]:
    """Load `source` into the store and run `steps` (by default the pipeline's, as last deployed)
    on it; `data` and `images` replay a past run."""
    image = tag_run_with_image()
    registry = image.split("/", 1)[0]
    if foreign := sorted(i for i in (images or {}).values() if not i.startswith(f"{registry}/")):
        raise ValueError(f"images {foreign} are not of this platform's registry {registry}")
    steps = steps if steps is not None else registered_steps()
    groups = step_groups(steps)
    layout = RunLayout.of(flow_run.id)
    if data is None:
        data = ingest(source, layout.input, Settings(), max_bytes, fetch_timeout_s, max_columns)
    else:
        confined(data["uri"], runs_root())  # a replay reads only what a run stored
        verify(data)  # a replay: fail here, before any step runs, if the input is gone
    get_run_logger().info("input: %d rows, %d bytes at %s", data["rows"], data["bytes"], data["uri"])
    results = run_steps(groups, data, layout, images or {}, step_timeout_s)
    output = {
        "main_flow_run_id": str(flow_run.id),
        "main_image": image,
        "source": redact(source),
        "steps": steps,
        "input": data,
        "results": results,
        "output_uri": layout.output,
        **usage(),
    }
    with atomic_write(layout.output) as file:
        file.write(json.dumps(output, indent=2).encode())
    create_markdown_artifact(
        key="pipeline-output",
        markdown="\n\n".join([f"Output: `{layout.output}`"] + [r["report"] for r in results.values()]),
        description=f"Pipeline output for {redact(source)}",
    )
    return output
