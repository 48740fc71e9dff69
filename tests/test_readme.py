"""The README's walkthroughs, run as written against the test stack: a README edit that breaks
one fails here. Only the environment differs (the stack's project, ports and registry, and the
host's .venv for make), and placeholders such as <main run id> are filled from earlier output.
Each runs in a copy of the project, so the repository is never changed."""

import json

import pytest

from tests.harness import expected_summary, fill, project_copy, readme_blocks, run_a_file_of_yours, run_id

pytestmark = pytest.mark.e2e


def test_a_file_of_yours_runs_as_the_readme_says_uploaded_once(stack, tmp_path):
    """README's first run on the file store; tests/test_storage.py has it on S3."""
    _, output, table = run_a_file_of_yours(stack, tmp_path, seed=5)  # the volume's inbox: PIPELINE_DATA_URL
    assert output["results"]["subflow/subflow"]["summary"] == expected_summary(table)


def test_adding_a_component_and_editing_steps_as_the_readme_says(stack, tmp_path):
    """Adding a component: the scaffold, one deploy, one run; then Reading the output. Until the
    deploy, `make run` warns that prefect.yaml's steps are not the registered pipeline and runs
    the registered one; afterwards the README's `prefect deploy --name main` registers the
    repository's steps again, building nothing."""
    project = project_copy(tmp_path)
    (adding,) = readme_blocks("## Adding a component")
    assert adding[0] == "make component NAME=enrich" and len(adding) == 3, adding
    (register,) = [b for b in readme_blocks("## Pipelines") if b]
    try:
        scaffolded = stack.shell(adding[0], cwd=project)
        assert "the pipeline's steps end with enrich/enrich" in scaffolded
        assert "prefect deploy --name enrich" in scaffolded  # the scaffold's "Next:" is the README's
        warned = stack.sh("make", "run", cwd=project, VENV=str(stack.venv))
        edited = "['validate/validate', 'subflow/subflow', 'enrich/enrich']"
        assert f"warning: prefect.yaml's steps {edited} are not the registered pipeline" in warned.stderr
        assert "prefect deploy --name main" in warned.stderr
        assert list(stack.output(stack.read_run(run_id(warned.stdout)))["results"]) == [
            "validate/validate", "subflow/subflow"
        ]  # fmt: skip

        printed = [stack.shell(command, cwd=project) for command in adding[1:]]
        run = stack.read_run(run_id(printed[1]))
        assert run.state.is_completed(), run.state
        (reading,) = [b for b in readme_blocks("## Data by reference") if b[0].startswith("make output")]
        printed = stack.shell(fill(reading[0], main_run_id=str(run.id)), cwd=project)
        output = json.loads(printed[printed.index("\n{") + 1 :])  # after make's echo of the command
        assert list(output["results"]) == ["validate/validate", "subflow/subflow", "enrich/enrich"]
        enrich = output["results"]["enrich/enrich"]
        assert enrich["image"].startswith(f"{stack.registry}/enrich@sha256:")
        # Each step gets the previous step's output: here the subflow's summary, 3 groups x 6 columns.
        assert enrich["output"] == output["results"]["subflow/subflow"]["output"]
        assert enrich["summary"] == [{"rows": 3, "columns": 6}]
        again = stack.sh("make", "component", "NAME=enrich", cwd=project, check=False, VENV=str(stack.venv))
        assert again.returncode != 0 and "'enrich' is taken" in again.stderr
    finally:
        with stack.api() as client:  # the repository's pipeline again, as the README registers it
            client.delete_deployment(stack.deployment("enrich/enrich").id)
        deployed = stack.shell(register[0])
    assert "Running in " not in deployed and "Pushed\n" not in deployed  # built and pushed nothing
    with stack.api() as client:
        assert client.read_variable_by_name("pipeline-steps-main").value == ["validate/validate", "subflow/subflow"]
