"""Main flow: fetch a dataset, process it in the `subflow` deployment, store the pipeline output."""

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Cancelled, Cancelling
from prefect.variables import Variable

# The contract with the subflow component: its deployment, the parameters passed (see
# `subflow_parameters`) and the result keys read, with their types. tests/test_contract.py
# checks all three against the subflow's real signature.
SUBFLOW_DEPLOYMENT = "subflow/subflow"
SUBFLOW_RESULT: dict[str, type] = {
    "rows": int,
    "groups": int,
    "summary": list,
    "report": str,
    "variable": str,
    "image": str,
}
COMPONENT_DIR = Path(__file__).resolve().parent


class PipelineError(RuntimeError):
    """The subflow did not deliver a usable result."""


@task
def fetch(source: str) -> list[dict[str, str]]:
    """Read CSV records from an http(s) URL or a file path (relative to main_flow/)."""
    if source.startswith(("http://", "https://")):
        # Retry only connection failures (transient); an HTTP error status is final.
        with httpx.Client(transport=httpx.HTTPTransport(retries=3), timeout=30) as client:
            try:
                response = client.get(source, follow_redirects=True)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                raise ValueError(f"cannot fetch source {source!r}: {exc}") from exc
        text = response.text
    else:
        path = Path(source)
        path = path if path.is_absolute() else COMPONENT_DIR / path
        if not path.is_file():
            raise FileNotFoundError(f"source file not found: {path}")
        text = path.read_text(encoding="utf-8")
    return parse_csv(text, source)


def parse_csv(text: str, source: str) -> list[dict[str, str]]:
    """Parse CSV text with a header row; reject empty or ragged data."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or any(not name.strip() for name in reader.fieldnames):
        raise ValueError(f"malformed dataset {source!r}: missing or blank header row")
    records = []
    for record in reader:
        if None in record or None in record.values():
            raise ValueError(
                f"malformed dataset {source!r}: line {reader.line_num} has "
                f"a different number of fields than the header ({len(reader.fieldnames)})"
            )
        records.append(record)
    if not records:
        raise ValueError(f"empty dataset {source!r}: a header but no data rows")
    return records


def subflow_parameters(records: list[dict[str, str]], source: str) -> dict[str, Any]:
    """The parameters of one subflow run."""
    return {"records": records, "source": source}


def call_subflow(
    deployment: str,
    records: list[dict[str, str]],
    source: str,
    timeout_s: float,
    poll_interval_s: float,
) -> tuple[UUID, dict[str, Any]]:
    """Run the subflow deployment as a child run, wait for it; its run id and result."""
    try:
        child = run_deployment(
            deployment,
            parameters=subflow_parameters(records, source),
            timeout=timeout_s,
            poll_interval=poll_interval_s,
        )
    except ObjectNotFound as exc:
        raise PipelineError(
            f"deployment {deployment!r} not found: register it with "
            f"`prefect deploy --name {deployment.split('/')[-1]}`"
        ) from exc
    state = child.state
    if state is None or not state.is_final():
        cancel(child.id, f"main flow stopped waiting after {timeout_s}s")
        raise PipelineError(
            f"subflow run {child.name!r} did not finish within {timeout_s}s "
            f"(state {state.name if state else 'unknown'}); it was cancelled. Check that "
            "worker-subflow is running and polling work pool 'subflow-pool'."
        )
    if not state.is_completed():
        raise PipelineError(f"subflow run {child.name!r} ended {state.name}: {state.message}")
    result = state.result()
    wrong = [k for k, kind in SUBFLOW_RESULT.items() if not isinstance(result.get(k), kind)]
    if wrong:
        raise PipelineError(f"subflow result lacks or mistypes {wrong}: {str(result)[:300]}")
    return child.id, result


def cancel(run_id: UUID, reason: str) -> None:
    """Cancel a child run that will not be waited for: never leave it queued forever."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        # A run that has not started yet is cancelled outright; a running one via its worker.
        started = run.state is not None and run.state.is_running()
        state = Cancelling(message=reason) if started else Cancelled(message=reason)
        client.set_flow_run_state(run_id, state, force=True)


@task
def store_output(output: dict[str, Any], output_dir: str, name: str) -> Path:
    """Write the output as JSON atomically: readers see the old file or the new one, never half."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(output, file, indent=2)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target


@flow(name="main-flow")
def main_flow(
    source: str = "data/iris.csv",
    output_dir: str = "/output",
    subflow_timeout_s: float = 300.0,
    poll_interval_s: float = 0.5,
    subflow_deployment: str = SUBFLOW_DEPLOYMENT,
) -> dict[str, Any]:
    """Fetch `source`, have the subflow summarise it, and store the result in `output_dir`."""
    logger = get_run_logger()
    image = tag_run_with_image()
    records = fetch(source)
    logger.info("fetched %d records from %s", len(records), source)
    child_id, result = call_subflow(
        subflow_deployment, records, source, subflow_timeout_s, poll_interval_s
    )
    published = Variable.get(result["variable"])
    if published != result["summary"]:
        raise PipelineError(f"Variable {result['variable']!r} does not match the subflow result")
    output = {
        "source": source,
        "main_flow_run_id": str(flow_run.id),
        "main_image": image,
        "subflow_run_id": str(child_id),
        "subflow_image": result.pop("image"),
        **result,
    }
    path = store_output(output, output_dir, str(flow_run.id))
    create_markdown_artifact(
        key="pipeline-output",
        markdown=f"Output file: `{path}`\n\n{result['report']}",
        description=f"Pipeline output for {source}",
    )
    logger.info("stored the pipeline output in %s", path)
    return output


def tag_run_with_image() -> str:
    """Tag this run with the image it runs in (set by the deployment): the UI shows what ran."""
    image = os.environ.get("COMPONENT_IMAGE", "unknown")
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=[*flow_run.tags, f"image:{image}"])
    return image
