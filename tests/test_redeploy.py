"""Independent components on real Docker: redeploy one, in flight, roll back, replay and resume
with the README's make commands as written, one new version serving them all. (Adding one:
tests/test_readme.py.)

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


def image_id(stack, image: str, check: bool = True) -> str:
    """The local image's id; empty if this engine has none (check=False)."""
    return stack.sh("docker", "image", "inspect", "--format", "{{.Id}}", image, check=check).stdout.strip()


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


def test_an_unchanged_deploy_builds_and_pushes_nothing(stack, capsys):
    """A deploy right after a deploy: the first, only if this engine lacks an image's tag (the
    redeploy story below removes one, should this test run after it)."""
    names = ("main-flow/main", "validate/validate", "subflow/subflow")
    built = [f"{d.job_variables['image'].split('@')[0]}:{d.version}" for d in map(stack.deployment, names)]
    if not all(image_id(stack, tag, check=False) for tag in built):  # a pulled image has its digest, not its tag
        stack.deploy()
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


def test_a_subflow_version_fixed_alone_in_flight_resumed_replayed_and_rolled_back(stack, restore, tmp_path, capsys):
    """One new subflow version serves every path of the README's section, with its commands as written:
    1. v1 (the repository's) runs a pipeline; then a version that cannot import a module, deployed
       alone, fails a second once (not retried), naming the module and the fix.
    2. The fix, a one-line change to the subflow and one to the kit, is deployed with `prefect
       deploy --name subflow` while a step run waits for its worker: it builds only the subflow,
       only its image carries the new kit, and the waiting step runs it.
    3. `make resume` reuses the failed run's ingest and validate and runs only the fixed subflow.
    4. `make replay` of the first run runs its old images on its old input.
    5. A step whose container already runs finishes on its own image while `make rollback` returns
       the subflow to v1, pulled from the registry, never rebuilt."""
    first = stack.deployment("subflow/subflow")
    v1, tag1 = first.job_variables["image"], first.version
    assert v1 == f"{stack.registry}/subflow@{v1.split('@')[1]}" and v1.split("@")[1].startswith("sha256:")
    old = stack.run("main-flow/main")
    old_output = stack.output(old)
    broken = project_copy(tmp_path / "broken")
    code = broken / "subflow" / "subflow.py"
    code.write_text(f"import not_installed_module  # noqa: F401\n{code.read_text()}")
    stack.deploy("subflow", cwd=broken)
    failed = stack.run("main-flow/main", refresh=["ingest", "validate/validate"])  # computed here
    missing = "ModuleNotFoundError: No module named 'not_installed_module'"
    assert failed.state.is_failed() and missing in failed.state.message, failed.state
    assert "requirements.txt" in failed.state.message
    (attempt,) = [c for c in stack.children(failed.id) if stack.flow_name(c) == "subflow"]  # not retried
    assert attempt.state.is_failed() and missing in attempt.state.message, attempt.state
    assert not stack.containers(attempt.id)

    # 2. The fix, deployed while a step run exists but its worker has not started it.
    before = {name: stack.deployment(name) for name in ("main-flow/main", "validate/validate", "subflow/subflow")}
    project = changed_subflow(tmp_path / "fixed", "v2")
    kit = project / "stepkit" / "contract.py"
    change = f"# kit change v2 {time.time_ns()}"  # a new image each time: no cache entry from an earlier try
    kit.write_text(f"{kit.read_text()}{change}\n")
    stack.compose("stop", "worker-subflow")
    try:
        # Its ingest from the cache, so that the failed run's stays the one `make resume` reuses.
        waiting = stack.start("main-flow/main", steps=["subflow/subflow"], refresh=["subflow/subflow"])
        child = stack.child(waiting.id, "subflow")
        assert child.state.is_scheduled() or child.state.is_pending(), child.state
        started = time.monotonic()
        stack.shell(DEPLOY_ONE, cwd=project)
        seconds = time.monotonic() - started
    finally:
        stack.compose("up", "-d", "--wait", "--no-deps", "worker-subflow")
    with capsys.disabled():
        print(f"\n[measure] prefect deploy --name subflow after a one-line change: {seconds:.1f}s")
    for name in ("main-flow/main", "validate/validate"):
        after = stack.deployment(name)
        assert (after.updated, after.job_variables, after.version) == (
            before[name].updated, before[name].job_variables, before[name].version,
        )  # fmt: skip
    sub = stack.deployment("subflow/subflow")
    v2, tag2 = sub.job_variables["image"], sub.version
    assert v2 != before["subflow/subflow"].job_variables["image"] and v2 != v1
    assert tag2 != before["subflow/subflow"].version
    assert stack.wait_final(waiting.id).state.is_completed()
    result = stack.output(waiting)["results"]["subflow/subflow"]
    assert result["image"] == v2 and result["report"].startswith("### v2 ")

    # 3. Resume: only the fixed step runs.
    printed = stack.shell(fill(RESUME, main_run_id=str(failed.id)))
    run = stack.read_run(printed.split("UUID: ", 1)[1].split()[0])
    assert run.state.is_completed(), run.state
    output = stack.output(run)
    assert output["cached"] == {"ingest": str(failed.id), "validate/validate": str(failed.id)}
    assert {stack.flow_name(child) for child in stack.children(run.id)} == {"subflow"}
    assert output["results"]["subflow/subflow"]["report"].startswith("### v2 150 rows")
    assert output["results"]["subflow/subflow"]["image"] == v2
    assert output["main_image"] == before["main-flow/main"].job_variables["image"]
    assert kit_has(stack, v2, change)
    assert not kit_has(stack, output["main_image"], change)

    # 4. Replay of the first run: its images, its stored input.
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

    # 5. Rollback while a step's container runs: that step finishes on v2, the next runs v1.
    listing = stack.shell(VERSIONS)
    marks = {line.split()[-2]: line.startswith("*") for line in listing.splitlines() if len(line.split()) >= 2}
    assert marks[tag2] and not marks[tag1], listing
    # Remove v1 from this engine: the run after the rollback must pull it from the registry, not rebuild.
    # Every name of it in the test registry (its tag may be gone already); the user's stack may share the image.
    names = "{{range .RepoTags}}{{.}} {{end}}{{range .RepoDigests}}{{.}} {{end}}"
    refs = stack.sh("docker", "image", "inspect", "-f", names, v1).stdout.split()
    for ref in [ref for ref in refs if ref.startswith(f"{stack.registry}/")]:  # the last one deletes the rest
        stack.sh("docker", "image", "rm", ref, check=False)
    assert stack.sh("docker", "image", "inspect", v1, check=False).returncode != 0
    running = stack.start("main-flow/main", steps=["subflow/subflow"])
    child = stack.child(running.id, "subflow")
    container = wait_for("the step's container", lambda: stack.containers(child.id, running=True), 120, every=0.1)
    stack.sh("docker", "pause", *container)
    try:
        rolled = stack.shell(fill(ROLLBACK, tag=tag1))
    finally:
        stack.sh("docker", "unpause", *container)
    assert f"now runs {v1}" in rolled
    assert stack.deployment("subflow/subflow").job_variables["image"] == v1
    assert stack.deployment("subflow/subflow").version == tag1
    assert stack.wait_final(running.id).state.is_completed()
    result = stack.output(running)["results"]["subflow/subflow"]
    assert result["image"] == v2 and result["report"].startswith("### v2 ")
    run = stack.run("main-flow/main", refresh=["subflow/subflow"])  # its container, not a cache hit
    assert run.state.is_completed(), run.state
    result = stack.output(run)["results"]["subflow/subflow"]
    assert result["image"] == v1 and result["report"].startswith("### 150 rows")
    image_id(stack, v1)  # pulled back by the worker

    missing = stack.sh("bash", "-c", fill(ROLLBACK, tag="0000deadbeef"), check=False)
    assert missing.returncode != 0
    assert f"{stack.registry}/subflow:0000deadbeef is not in the registry" in missing.stderr
