"""Independent components on real Docker: redeploy one, in flight, roll back, add a component.

Changed components are deployed from a copy of the project, so the repository stays untouched;
`restore` redeploys the repository's own version afterwards.
"""

import time
from pathlib import Path

import pytest
from e2e import (
    child_of,
    compose,
    container_starts,
    containers_of,
    deploy,
    deployment,
    project_copy,
    read_output,
    sh,
    trigger,
    wait_final,
    wait_for,
)

pytestmark = pytest.mark.e2e

HEADING = '    return f"### {rows} rows'


def changed_subflow(directory: Path, marker: str) -> Path:
    """A project copy whose subflow report starts with `marker`: a one-line code change."""
    project = project_copy(directory)
    code = project / "subflow" / "subflow.py"
    text = code.read_text()
    assert HEADING in text
    code.write_text(text.replace(HEADING, f'    return f"### {marker} {{rows}} rows'))
    return project


def image_id(image: str) -> str:
    return sh("docker", "image", "inspect", "--format", "{{.Id}}", image).stdout.strip()


def local_images() -> set[str]:
    """Every image tag in this engine, with its id."""
    listing = sh("docker", "images", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}")
    return set(listing.stdout.splitlines())


@pytest.fixture
def restore(stack):
    """Redeploy the repository's subflow after a test that deployed another version."""
    yield
    deploy("subflow")


def test_redeploy_one_component_leaves_the_others_alone(stack, restore, tmp_path, capsys):
    main_before = deployment("main-flow/main")
    main_image_id = image_id(main_before.job_variables["image"])
    sub_before = deployment("subflow/subflow")

    seconds = deploy("subflow", cwd=changed_subflow(tmp_path, "v2"))
    with capsys.disabled():
        print(f"\n[measure] prefect deploy --name subflow after a one-line change: {seconds:.1f}s")

    main_after = deployment("main-flow/main")
    assert main_after.updated == main_before.updated
    assert main_after.job_variables == main_before.job_variables
    assert main_after.version == main_before.version
    assert image_id(main_after.job_variables["image"]) == main_image_id
    sub_after = deployment("subflow/subflow")
    assert sub_after.job_variables["image"] != sub_before.job_variables["image"]
    assert sub_after.version != sub_before.version

    run = trigger("main-flow/main")
    assert run.state.is_completed(), run.state
    output = read_output(str(run.id))
    assert output["report"].startswith("### v2 150 rows")
    assert output["subflow_image"] == sub_after.job_variables["image"]
    assert output["main_image"] == main_before.job_variables["image"]


def test_unchanged_deploy_all_rebuilds_nothing(stack, capsys):
    names = ("main-flow/main", "subflow/subflow")
    images = {name: deployment(name).job_variables["image"] for name in names}
    ids = {d: image_id(image) for d, image in images.items()}
    seconds = deploy()
    with capsys.disabled():
        print(f"\n[measure] prefect deploy --all with no change: {seconds:.1f}s")
    for name, image in images.items():
        assert deployment(name).job_variables["image"] == image
        assert image_id(image) == ids[name]


def test_redeploy_while_a_run_is_in_flight(stack, restore, tmp_path):
    """The subflow version is fixed when worker-subflow starts the child's container."""
    v1 = deployment("subflow/subflow").job_variables["image"]

    # 1. The child run exists but has not started: it runs the version deployed by then.
    compose("stop", "worker-subflow")
    try:
        waiting = trigger("main-flow/main", watch=False)
        child = child_of(waiting.id)
        assert child.state.is_scheduled() or child.state.is_pending(), child.state
        deploy("subflow", cwd=changed_subflow(tmp_path / "a", "v2"))
    finally:
        compose("start", "worker-subflow")
    v2 = deployment("subflow/subflow").job_variables["image"]
    assert wait_final(waiting.id).state.is_completed()
    assert read_output(str(waiting.id))["subflow_image"] == v2

    # 2. The child's container is already running: it finishes on its own image.
    running = trigger("main-flow/main", watch=False)
    child = child_of(running.id)
    container = wait_for(
        "the child's container", lambda: containers_of(child.id, running=True).strip(), 120
    )
    sh("docker", "pause", container)
    try:
        deploy("subflow", cwd=changed_subflow(tmp_path / "b", "v3"))
    finally:
        sh("docker", "unpause", container)
    assert deployment("subflow/subflow").job_variables["image"] not in (v1, v2)
    assert wait_final(running.id).state.is_completed()
    output = read_output(str(running.id))
    assert output["subflow_image"] == v2 and output["report"].startswith("### v2 ")


def test_rollback_to_an_earlier_version_without_a_build(stack, restore, tmp_path):
    v1 = deployment("subflow/subflow").job_variables["image"]
    deploy("subflow", cwd=changed_subflow(tmp_path, "v2"))
    v2 = deployment("subflow/subflow").job_variables["image"]
    tag1, tag2 = v1.rsplit(":", 1)[1], v2.rsplit(":", 1)[1]

    listing = compose("run", "--rm", "-T", "cli", "python", "versions.py", "list", "subflow")
    marks = {line.split()[-2]: line.startswith("*") for line in listing.stdout.splitlines()}
    assert marks[tag2] and not marks[tag1], listing.stdout

    # Remove v1 from this engine: the run below must pull it from the registry, not rebuild.
    sh("docker", "image", "rm", v1)
    images_before = local_images()
    rollback = ("run", "--rm", "-T", "cli", "python", "versions.py", "rollback", "subflow", tag1)
    assert f"now runs {v1}" in compose(*rollback).stdout
    assert local_images() == images_before
    assert deployment("subflow/subflow").job_variables["image"] == v1
    assert deployment("subflow/subflow").version == tag1

    run = trigger("main-flow/main")
    assert run.state.is_completed(), run.state
    output = read_output(str(run.id))
    assert output["subflow_image"] == v1
    assert output["report"].startswith("### 150 rows")

    missing = compose(*rollback[:-1], "0000deadbeef", check=False)
    assert missing.returncode != 0
    assert "localhost:5000/subflow:0000deadbeef is not in the registry" in missing.stderr


COMPONENT = '''"""A generated component: greets, and says which image it ran in."""

import os

from prefect import flow


@flow(name="hello", persist_result=True, result_serializer="json")
def hello(name: str = "world") -> dict[str, str]:
    """Greet `name`."""
    return {"greeting": f"hello {name}", "image": os.environ["COMPONENT_IMAGE"]}
'''

YAML_BLOCK = """
  - name: hello
    entrypoint: hello/hello.py:hello
    version: "{{ content-hash.stdout }}"
    build:
      - prefect.deployments.steps.run_shell_script:
          <<: *content_hash
          directory: hello
      - prefect_docker.deployments.steps.build_docker_image:
          <<: *build_image
          image_name: localhost:5000/hello
          path: hello
    work_pool:
      name: subflow-pool
      job_variables: *job_variables
"""


def test_add_a_component_by_editing_the_yaml(stack, tmp_path):
    """The README's walk-through: a directory, a Dockerfile, a yaml block, deploy, run."""
    project = project_copy(tmp_path)
    component = project / "hello"
    component.mkdir()
    (component / "hello.py").write_text(COMPONENT)
    (component / "requirements.txt").write_text("")
    dockerfile = (project / "subflow" / "Dockerfile").read_text()
    (component / "Dockerfile").write_text(dockerfile.replace("subflow", "hello"))
    with (project / "prefect.yaml").open("a") as file:
        file.write(YAML_BLOCK)

    started = time.time() - 1
    deploy("hello", cwd=project)
    image = deployment("hello/hello").job_variables["image"]
    assert image.startswith("localhost:5000/hello:")
    run = trigger("hello/hello", "name=platform")
    assert run.state.is_completed(), run.state
    assert container_starts(started)[str(run.id)]["image"] == image
    # Its persisted result, read from the shared results volume.
    stored = compose(
        "run", "--rm", "-T", "-v", "modular-pipeline-results:/results:ro", "cli",
        "cat", run.state.data.storage_key,
    ).stdout  # fmt: skip
    assert "hello platform" in stored and image in stored
