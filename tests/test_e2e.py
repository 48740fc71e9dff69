"""End to end on real Docker, exactly as the README says: stack up, deploy, run the pipeline."""

import time

import pytest
from conftest import IRIS_SETOSA
from e2e import (
    api,
    child_of,
    container_starts,
    containers_of,
    has_pandas,
    read_output,
    trigger,
    wait_for,
)
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline_run(stack):
    """One pipeline run of the default dataset: (main run, subflow run, start time)."""
    started = time.time() - 1
    main = trigger("main-flow/main")
    return main, child_of(main.id), started


def test_pipeline_run_completes_and_links_the_subflow_as_its_child(pipeline_run):
    main, child, _ = pipeline_run
    assert main.state.is_completed(), main.state
    assert child.state.is_completed(), child.state
    with api() as client:
        assert client.read_deployment(main.deployment_id).name == "main"
        assert client.read_deployment(child.deployment_id).name == "subflow"
        # run_deployment links the child through a task run of the parent.
        assert client.read_task_run(child.parent_task_run_id).flow_run_id == main.id


def test_each_flow_ran_in_its_own_container_from_its_own_image(pipeline_run):
    main, child, started = pipeline_run
    starts = container_starts(started)
    with api() as client:
        images = {
            run.id: client.read_deployment(run.deployment_id).job_variables["image"]
            for run in (main, child)
        }
    assert images[main.id].startswith("localhost:5000/main-flow:")
    assert images[child.id].startswith("localhost:5000/subflow:")
    assert starts[str(main.id)]["image"] == images[main.id]
    assert starts[str(child.id)]["image"] == images[child.id]
    assert starts[str(main.id)]["id"] != starts[str(child.id)]["id"]
    # Each image carries only its own dependencies: pandas is the subflow's alone.
    assert has_pandas(images[child.id]) and not has_pandas(images[main.id])
    # auto_remove: no flow-run container is left behind.
    for run in (main, child):
        wait_for(f"container of run {run.id} to be removed", lambda r=run: not containers_of(r.id))


def test_subflow_result_reaches_the_main_flow_and_lands_in_the_output(pipeline_run):
    main, child, _ = pipeline_run
    output = read_output(str(main.id))
    assert output["main_flow_run_id"] == str(main.id)
    assert output["source"] == "data/iris.csv"
    assert output["rows"] == 150 and output["groups"] == 3
    assert output["subflow_run_id"] == str(child.id)
    with api() as client:
        for run, key in ((main, "main_image"), (child, "subflow_image")):
            image = client.read_deployment(run.deployment_id).job_variables["image"]
            assert output[key] == image
            # Each run is tagged with the image it ran in, visible in the UI and the API.
            assert f"image:{image}" in client.read_flow_run(run.id).tags
    assert output["summary"][0] == IRIS_SETOSA
    assert output["variable"] == f"subflow-output-{child.id}"
    assert "150 rows from `data/iris.csv` in 3 groups" in output["report"]


def test_variable_and_artifacts_hold_the_output(pipeline_run):
    main, child, _ = pipeline_run
    output = read_output(str(main.id))
    with api() as client:
        assert client.read_variable_by_name(f"subflow-output-{child.id}").value == output["summary"]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[main.id, child.id])
            )
        )
    by_key = {a.key: a for a in artifacts}
    assert by_key["subflow-report"].flow_run_id == child.id
    assert by_key["subflow-report"].data == output["report"]
    assert by_key["pipeline-output"].flow_run_id == main.id
    assert f"/output/{main.id}.json" in by_key["pipeline-output"].data
    assert "| setosa" in by_key["pipeline-output"].data
