"""Independent components on real Docker: redeploy one, in flight, roll back, replay and resume
with the README's make commands as written. (Adding one: tests/test_readme.py.)

Changed components are deployed from a copy of the project, so the repository stays untouched;
`restore` redeploys the repository's own subflow afterwards.
"""

import time
from pathlib import Path

import pytest

from tests.harness import fill, project_copy, readme_blocks, wait_for

pytestmark = pytest.mark.e2e

HEADING = '    heading = f"### {data'
# The README's blocks, run as written: deploy one or all, then versions, rollback, replay.
(DEPLOY_ONE, DEPLOY_ALL), (VERSIONS, ROLLBACK, REPLAY) = readme_blocks("## Redeploying, rolling back, replaying")
(RESUME,) = [line for block in readme_blocks("## Caching and resume") for line in block if "make resume" in line]


def changed_subflow(directory: Path, marker: str) -> Path:
    """A project copy whose subflow report starts with `marker`: a one-line code change."""
    project = project_copy(directory)
    code = project / "subflow" / "subflow.py"
    text = code.read_text()
    assert HEADING in text
    code.write_text(text.replace(HEADING, f'    heading = f"### {marker} {{data'))
    return project


def image_id(stack, image: str) -> str:
    return stack.sh("docker", "image", "inspect", "--format", "{{.Id}}", image).stdout.strip()


@pytest.fixture
def restore(stack):
    """Redeploy the repository's subflow after a test that left another version deployed."""
    image = stack.deployment("subflow/subflow").job_variables["image"]
    yield
    if stack.deployment("subflow/subflow").job_variables["image"] != image:
        stack.deploy("subflow")


def kit_has(stack, image: str, marker: str) -> bool:
    """Whether the step kit inside `image` carries `marker`."""
    probe = f"import inspect, stepkit.contract as c; print({marker!r} in inspect.getsource(c))"
    return stack.sh("docker", "run", "--rm", "--entrypoint", "python", image, "-c", probe).stdout.strip() == "True"


def test_a_fix_redeployed_alone_and_resumed_runs_only_the_fixed_step(stack, restore, tmp_path, capsys):
    """A bug in the last step fails a run. The fix, a one-line change to the subflow and one to
    the kit, deployed with `prefect deploy --name subflow`, builds only the subflow, and only its
    image carries the new kit. `make resume` then reuses the failed run's ingest and validate
    (their keys are unchanged) and runs only the fixed subflow."""
    broken = project_copy(tmp_path / "broken")
    code = broken / "subflow" / "subflow.py"
    code.write_text(code.read_text().replace(HEADING, f'    raise RuntimeError("a bug")\n{HEADING}'))
    stack.deploy("subflow", cwd=broken)
    failed = stack.run("main-flow/main", refresh=["ingest", "validate/validate"])  # computed here
    assert failed.state.is_failed() and "a bug" in failed.state.message, failed.state

    before = {name: stack.deployment(name) for name in ("main-flow/main", "validate/validate", "subflow/subflow")}
    project = changed_subflow(tmp_path / "fixed", "v2")
    kit = project / "stepkit" / "contract.py"
    kit.write_text(kit.read_text() + "# kit change v2\n")
    started = time.monotonic()
    stack.shell(DEPLOY_ONE, cwd=project)
    seconds = time.monotonic() - started
    with capsys.disabled():
        print(f"\n[measure] prefect deploy --name subflow after a one-line change: {seconds:.1f}s")
    for name in ("main-flow/main", "validate/validate"):
        after = stack.deployment(name)
        assert (after.updated, after.job_variables, after.version) == (
            before[name].updated, before[name].job_variables, before[name].version,
        )  # fmt: skip
    sub = stack.deployment("subflow/subflow")
    assert sub.job_variables["image"] != before["subflow/subflow"].job_variables["image"]
    assert sub.version != before["subflow/subflow"].version

    printed = stack.shell(fill(RESUME, main_run_id=str(failed.id)))
    run = stack.read_run(printed.split("UUID: ", 1)[1].split()[0])
    assert run.state.is_completed(), run.state
    output = stack.output(run)
    assert output["cached"] == {"ingest": str(failed.id), "validate/validate": str(failed.id)}
    assert {stack.flow_name(child) for child in stack.children(run.id)} == {"subflow"}
    assert output["results"]["subflow/subflow"]["report"].startswith("### v2 150 rows")
    assert output["results"]["subflow/subflow"]["image"] == sub.job_variables["image"]
    assert output["main_image"] == before["main-flow/main"].job_variables["image"]
    assert kit_has(stack, sub.job_variables["image"], "# kit change v2")
    assert not kit_has(stack, output["main_image"], "# kit change v2")


def test_an_unchanged_deploy_builds_and_pushes_nothing(stack, capsys):
    names = ("main-flow/main", "validate/validate", "subflow/subflow")
    images = {name: stack.deployment(name).job_variables["image"] for name in names}
    ids = {name: image_id(stack, image) for name, image in images.items()}
    started = time.monotonic()
    output = stack.shell(DEPLOY_ALL)
    seconds = time.monotonic() - started
    with capsys.disabled():
        print(f"\n[measure] prefect deploy --all with no change: {seconds:.1f}s")
    for name, image in images.items():
        assert stack.deployment(name).job_variables["image"] == image
        assert image_id(stack, image) == ids[name]
    # Every build step came from Docker's cache (a step that ran says "Running in <container>"),
    # and every layer was already in the registry.
    assert output.count("Using cache") >= 3 * len(names) and "Running in " not in output
    assert "Layer already exists" in output and "Pushed\n" not in output


def test_redeploy_while_a_run_is_in_flight(stack, restore, tmp_path):
    """The subflow version is fixed when its worker starts the step's container."""
    v1 = stack.deployment("subflow/subflow").job_variables["image"]

    # 1. The step run exists but has not started: it runs the version deployed by then.
    stack.compose("stop", "worker-subflow")
    try:
        waiting = stack.start("main-flow/main", steps=["subflow/subflow"])
        child = stack.child(waiting.id, "subflow")
        assert child.state.is_scheduled() or child.state.is_pending(), child.state
        stack.deploy("subflow", cwd=changed_subflow(tmp_path / "a", "v2"))
    finally:
        stack.compose("up", "-d", "--wait", "worker-subflow")
    v2 = stack.deployment("subflow/subflow").job_variables["image"]
    assert stack.wait_final(waiting.id).state.is_completed()
    assert stack.output(waiting)["results"]["subflow/subflow"]["image"] == v2 != v1

    # 2. The step's container is already running: it finishes on its own image.
    running = stack.start("main-flow/main", steps=["subflow/subflow"])
    child = stack.child(running.id, "subflow")
    container = wait_for("the step's container", lambda: stack.containers(child.id, running=True), 120, every=0.1)
    stack.sh("docker", "pause", *container)
    try:
        stack.deploy("subflow", cwd=changed_subflow(tmp_path / "b", "v3"))
    finally:
        stack.sh("docker", "unpause", *container)
    assert stack.deployment("subflow/subflow").job_variables["image"] not in (v1, v2)
    assert stack.wait_final(running.id).state.is_completed()
    result = stack.output(running)["results"]["subflow/subflow"]
    assert result["image"] == v2 and result["report"].startswith("### v2 ")


def test_replay_runs_the_old_images_on_the_old_input_and_rollback_needs_no_build(stack, restore, tmp_path):
    """One new subflow version serves both: a replay of a run from before it runs the old images on
    the old input while new runs get the new version; a rollback then returns to the old image,
    pulled from the registry, never rebuilt."""
    first = stack.deployment("subflow/subflow")
    v1, tag1 = first.job_variables["image"], first.version
    assert v1 == f"{stack.registry}/subflow@{v1.split('@')[1]}" and v1.split("@")[1].startswith("sha256:")
    old = stack.run("main-flow/main")
    old_output = stack.output(old)
    stack.deploy("subflow", cwd=changed_subflow(tmp_path, "v2"))  # a new subflow since then
    tag2 = stack.deployment("subflow/subflow").version

    replayed = stack.shell(fill(REPLAY, main_run_id=str(old.id)))
    new_id = replayed.split(" as ", 1)[1].split()[0]
    new = stack.read_run(new_id)
    assert new.state.is_completed() and f"replay-of:{old.id}" in new.tags
    output = stack.output(new)
    assert output["input"] == old_output["input"]  # the same stored input, not fetched again
    assert output["main_image"] == old_output["main_image"]
    assert f"image:{old_output['main_image']}" in new.tags
    for name, result in output["results"].items():
        assert result["image"] == old_output["results"][name]["image"]
        assert result["summary"] == old_output["results"][name]["summary"]
    assert output["results"]["subflow/subflow"]["report"] == old_output["results"]["subflow/subflow"]["report"]
    assert not stack.exists(stack.layout(new_id).input)
    latest = stack.run("main-flow/main")  # while a new run gets the new subflow
    assert stack.output(latest)["results"]["subflow/subflow"]["report"].startswith("### v2 ")

    listing = stack.shell(VERSIONS)
    marks = {line.split()[-2]: line.startswith("*") for line in listing.splitlines() if len(line.split()) >= 2}
    assert marks[tag2] and not marks[tag1], listing
    # Remove v1 from this engine: the run below must pull it from the registry, not rebuild.
    stack.sh("docker", "image", "rm", v1, f"{stack.registry}/subflow:{tag1}")
    assert f"now runs {v1}" in stack.shell(fill(ROLLBACK, tag=tag1))
    assert stack.deployment("subflow/subflow").job_variables["image"] == v1
    assert stack.deployment("subflow/subflow").version == tag1
    run = stack.run("main-flow/main", refresh=["subflow/subflow"])  # its container, not a cache hit
    assert run.state.is_completed(), run.state
    result = stack.output(run)["results"]["subflow/subflow"]
    assert result["image"] == v1 and result["report"].startswith("### 150 rows")
    image_id(stack, v1)  # pulled back by the worker

    missing = stack.sh("bash", "-c", fill(ROLLBACK, tag="0000deadbeef"), check=False)
    assert missing.returncode != 0
    assert f"{stack.registry}/subflow:0000deadbeef is not in the registry" in missing.stderr
