"""End to end on real Docker, as the README says: stack up, deploy, run the three-component pipeline."""

import subprocess
import time

import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from conftest import IRIS_SETOSA

pytestmark = pytest.mark.e2e
FORMAT = '{{index .Actor.Attributes "io.prefect.flow-run-id"}} {{.Actor.ID}} {{.Actor.Attributes.image}}'


@pytest.fixture(scope="module")
def pipeline_run(stack):
    """One run of the default pipeline on the shipped data: (main run, its output, the flow-run
    containers that started meanwhile as {run id: [container, image]})."""
    # Followed as a stream: dockerd keeps only its last 256 events, which healthchecks fill in a minute.
    args = ["docker", "events", "--since", f"{time.time() - 1:.0f}", "--filter", "event=start",
            "--filter", "label=io.prefect.flow-run-id", "--format", FORMAT]  # fmt: skip
    events = subprocess.Popen(args, env=stack.env(), stdout=subprocess.PIPE, text=True)
    try:
        main = stack.run("main-flow/main")
    finally:
        events.terminate()
    assert main.state.is_completed(), main.state
    starts = {line.split()[0]: line.split()[1:] for line in events.communicate(timeout=30)[0].splitlines() if line}
    return main, stack.output(main), starts


def test_steps_run_in_order_each_a_child_of_the_main_run(stack, pipeline_run):
    main, output, _ = pipeline_run
    assert output["steps"] == ["validate/validate", "subflow/subflow"]
    validate, subflow = stack.child(main.id, "validate"), stack.child(main.id, "subflow")
    assert validate.state.is_completed() and subflow.state.is_completed()
    assert validate.end_time <= subflow.start_time  # one after the other
    with stack.api() as client:
        # run_deployment links each child through a task run of the parent.
        for child in (validate, subflow):
            assert client.read_task_run(child.parent_task_run_id).flow_run_id == main.id
    assert output["results"]["validate/validate"]["flow_run_id"] == str(validate.id)
    assert output["results"]["subflow/subflow"]["flow_run_id"] == str(subflow.id)


def test_each_flow_ran_in_its_own_container_from_its_own_image(stack, pipeline_run):
    main, output, starts = pipeline_run
    runs = {"main_flow": (main.id, output["main_image"])} | {
        name.split("/")[0]: (r["flow_run_id"], r["image"]) for name, r in output["results"].items()
    }
    for component, (run_id, image) in runs.items():
        assert image.startswith(f"{stack.registry}/{component}@sha256:"), image  # by digest
        assert starts[str(run_id)][1] == image
        # Each run is tagged with the image it ran in, visible in the UI and the API.
        assert f"image:{image}" in stack.read_run(run_id).tags
    assert len({container for container, _ in starts.values()}) == len(starts) == 3
    # Each image carries only its own dependencies: pandas is validate's alone.
    probe = "import importlib.util as u; print(u.find_spec('pandas') is not None)"
    has_pandas = {
        c: stack.sh("docker", "run", "--rm", image, "python", "-c", probe).stdout.strip()
        for c, (_, image) in runs.items()
    }
    assert has_pandas == {"main_flow": "False", "validate": "True", "subflow": "False"}
    for run_id, _ in runs.values():  # auto_remove: no flow-run container is left behind
        assert not stack.containers(run_id)


def test_data_travels_by_reference_and_lands_in_the_run_directory(stack, pipeline_run):
    main, output, _ = pipeline_run
    run_dir = stack.layout(main.id).dir
    assert output["input"]["uri"] == f"{run_dir}/input/part-00000.parquet"  # one part: under part_rows
    assert output["input"]["rows"] == 150 and output["input"]["columns"][-1] == "species"
    validate, subflow = output["results"]["validate/validate"], output["results"]["subflow/subflow"]
    assert validate["output"] == output["input"]  # validated data passes on unchanged
    assert subflow["output"]["uri"] == f"{run_dir}/subflow/summary.parquet"
    assert subflow["output"]["rows"] == 3 and subflow["groups"] == 3 and subflow["rows"] == 150
    assert subflow["summary"][0] == IRIS_SETOSA
    assert "150 rows from" in subflow["report"] and "in 3 groups by `species`" in subflow["report"]
    assert output["output_uri"] == f"{run_dir}/output.json"
    with stack.api() as client:  # only small references ever went through the API
        params = client.read_flow_run(subflow["flow_run_id"]).parameters
    assert params == {"data": output["input"], "out": f"{run_dir}/subflow"}


def test_variable_and_artifacts_hold_the_output(stack, pipeline_run):
    main, output, _ = pipeline_run
    subflow = output["results"]["subflow/subflow"]
    with stack.api() as client:
        variable = client.read_variable_by_name(subflow["variable"]).value
        runs = [main.id] + [r["flow_run_id"] for r in output["results"].values()]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=runs))
        )
    assert subflow["variable"] == f"subflow-output-{subflow['flow_run_id']}"
    assert variable == {
        "output": subflow["output"]["uri"],
        "rows": 150,
        "groups": 3,
        "summary": subflow["summary"],
        "truncated": False,
    }
    by_key = {a.key: a for a in artifacts}
    assert by_key["subflow-report"].data == subflow["report"]
    assert by_key["validate-report"].data == output["results"]["validate/validate"]["report"]
    assert by_key["pipeline-output"].flow_run_id == main.id
    assert output["output_uri"] in by_key["pipeline-output"].data
    assert "| setosa" in by_key["pipeline-output"].data


def test_a_parallel_group_runs_its_steps_at_once_on_the_same_input(stack):
    main = stack.run("main-flow/main", steps=[["validate/validate", "subflow/subflow"]])
    assert main.state.is_completed(), main.state
    output = stack.output(main)
    validate, subflow = stack.child(main.id, "validate"), stack.child(main.id, "subflow")
    # Both were started before either finished: the main flow did not wait for one to start the other.
    assert validate.created < subflow.end_time and subflow.created < validate.end_time
    for result in output["results"].values():
        assert stack.read_run(result["flow_run_id"]).parameters["data"] == output["input"]
    assert output["results"]["subflow/subflow"]["summary"][0] == IRIS_SETOSA
