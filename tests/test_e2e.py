"""End to end on real Docker, as the README says: stack up, deploy, run the three-component pipeline."""

import io
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.client.schemas.actions import VariableUpdate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from conftest import IRIS_SETOSA
from stepkit import parts_of
from tests.harness import ROOT, expected_summary, iris_like, project_copy, run_id, write_csv

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
    for component, (flow_run, image) in runs.items():
        assert image.startswith(f"{stack.registry}/{component}@sha256:"), image  # by digest
        assert starts[str(flow_run)][1] == image
        # Each run is tagged with the image it ran in, visible in the UI and the API.
        assert f"image:{image}" in stack.read_run(flow_run).tags
    assert len({container for container, _ in starts.values()}) == len(starts) == 3
    # Each image carries only its own dependencies: pandas is validate's alone.
    probe = "import importlib.util as u; print(u.find_spec('pandas') is not None)"
    has_pandas = {
        c: stack.sh("docker", "run", "--rm", image, "python", "-c", probe).stdout.strip()
        for c, (_, image) in runs.items()
    }
    assert has_pandas == {"main_flow": "False", "validate": "True", "subflow": "False"}
    for flow_run, _ in runs.values():  # auto_remove: no flow-run container is left behind
        assert not stack.containers(flow_run)


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


def test_a_second_pipeline_runs_as_a_graph_and_deploys_without_touching_the_first(stack, tmp_path):
    """prefect.yaml's `enriched` pipeline, a diamond: the ingest, then validate and subflow at
    once, then a join of their outputs; its run draws its graph. Then a checkout that declares only
    `enriched`, edited, deploys it: `main`'s steps and deployment are left as they were."""
    command = "make run PIPELINE=enriched"  # as README's Common tasks has it, on rows of its own: no step cached
    assert f"| run another pipeline | `{command}` |" in (ROOT / "README.md").read_text()
    project, table = project_copy(tmp_path), iris_like(300, seed=31)
    write_csv(table, project / "rows.csv")
    main = stack.wait_final(run_id(stack.shell(f"{command} SOURCE=./rows.csv", cwd=project)))
    assert main.state.is_completed(), main.state
    output = stack.output(main)
    assert output["graph"] == {
        "validate/validate": {"data": "ingest"},
        "subflow/subflow": {"data": "ingest"},
        "join/join": {"rows": "validate/validate", "groups": "subflow/subflow"},
    }
    validate, subflow = stack.child(main.id, "validate"), stack.child(main.id, "subflow")
    # Both were started before either finished: the main flow did not wait for one to start the other.
    assert validate.created < subflow.end_time and subflow.created < validate.end_time
    assert validate.parameters["data"] == subflow.parameters["data"] == output["input"]
    join = output["results"]["join/join"]
    assert stack.read_run(join["flow_run_id"]).parameters["groups"] == output["results"]["subflow/subflow"]["output"]
    stored = [pq.read_table(io.BytesIO(stack.read_object(part["uri"]))) for part in parts_of(join["output"])]
    joined = [row for table in stored for row in table.to_pylist()]
    groups = {group["species"]: group for group in expected_summary(table)}  # numpy's, not the flows'
    assert [row["species"] for row in joined] == table["species"].cast(pa.string()).to_pylist()  # in order
    assert all(row["count"] == groups[row["species"]]["count"] for row in joined)
    assert all(row["mean_petal_length"] == groups[row["species"]]["mean_petal_length"] for row in joined)
    with stack.api() as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[main.id]), key=ArtifactFilterKey(any_=["pipeline-status"])
            )
        )
        before = untouched(client, stack)
    chart = artifact.data.split("```mermaid\n", 1)[1]
    assert chart.splitlines()[2].startswith('  s1["validate/validate<br/>Completed<br/>300 rows<br/>')
    assert "  s0 --> s1\n  s0 --> s2\n  s1 -->|rows| s3\n  s2 -->|groups| s3\n```" in chart

    config = project / "prefect.yaml"
    text = config.read_text().replace("    main: &steps\n      - validate/validate\n      - subflow/subflow\n", "")
    config.write_text(text.replace("{step: join/join, needs:", "{step: join/join, cache: false, needs:"))
    with stack.api() as client:
        steps = client.read_variable_by_name("pipeline-steps-enriched").value
        try:
            stack.deploy("enriched", cwd=project)
            assert client.read_variable_by_name("pipeline-steps-enriched").value[2]["cache"] is False
            assert untouched(client, stack) == before
        finally:  # the repository's steps again (its deployment is the same: the same image, no parameters)
            client.update_variable(VariableUpdate(name="pipeline-steps-enriched", value=steps))


def untouched(client, stack) -> tuple:
    """What a deploy of another pipeline must leave as it was: main's steps and deployment."""
    variable, deployment = client.read_variable_by_name("pipeline-steps-main"), stack.deployment("main-flow/main")
    return variable.value, variable.updated, deployment.updated, deployment.parameters
