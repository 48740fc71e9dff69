"""Static checks of the platform's configuration: one home per setting, loopback ports, a small
block per component, portable and stable content tags, fresh locks. No Docker needed."""

import os
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import metadata
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from tests.harness import ROOT, SETTINGS

sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tools" / "deploy")]
import image_tag  # noqa: E402
import lock  # noqa: E402
import steps  # noqa: E402

COMPONENTS = ["main_flow", "validate", "subflow", "join"]
IMAGE_INPUTS = [*COMPONENTS, "stepkit"]  # what a component image's tag covers, besides the recipe


def tracked(*exclude: str) -> dict[str, str]:
    """Tracked text files (path -> text), without docs, lock files, data, recorded benchmark
    results (bench/*.json) and the given paths; configuration in JSON (pools/) is included."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    texts = {}
    for name in files.split():
        path = ROOT / name
        recorded = name.startswith("bench/") and path.suffix == ".json"
        if name in exclude or recorded or path.suffix in (".md", ".lock", ".csv", ".png") or not path.is_file():
            continue
        texts[name] = path.read_text(errors="replace")
    return texts


# Each setting's one home: a literal copy anywhere else (docs aside) fails the test. Values that
# are derived in .env (the host's API URL and registry address) may appear nowhere.
HOMES = {
    SETTINGS["PREFECT_VERSION"]: [".env"],
    "prefecthq/prefect": [".env"],
    SETTINGS["POSTGRES_IMAGE"]: [".env"],
    SETTINGS["REGISTRY_IMAGE"]: [".env"],
    SETTINGS["PYTHON_IMAGE"]: [".env"],
    SETTINGS["FLOW_POOL"]: [".env"],
    SETTINGS["SUBFLOW_POOL"]: [".env"],
    SETTINGS["PIPELINE_DATA_URL"]: [".env"],
    f"127.0.0.1:{SETTINGS['PREFECT_PORT']}": [],
    f"localhost:{SETTINGS['REGISTRY_PORT']}": [],
    f"FLOW_UID={SETTINGS['FLOW_UID']}": [".env"],
    "FLOW_POOL_LIMIT=": [".env"],
    "PREFECT_WORKER_QUERY_SECONDS=": [".env"],
    "http://gateway:4200/api": ["docker-compose.yml"],
    "prefect-docker==": ["worker/requirements.txt"],
}


@pytest.mark.parametrize("literal", list(HOMES))
def test_every_setting_has_one_home(literal):
    found = sorted(name for name, text in tracked("tests/test_config.py").items() if literal in text)
    assert found == HOMES[literal], f"{literal!r} is in {found}; its home is {HOMES[literal] or 'derived in .env'}"


def test_published_ports_bind_to_loopback():
    for compose in ("docker-compose.yml", "tests/compose.yml"):
        services = yaml.safe_load((ROOT / compose).read_text())["services"]
        ports = [p for s in services.values() for p in s.get("ports", [])]
        assert ports and all(p.startswith("127.0.0.1:") for p in ports), (compose, ports)


def test_a_component_block_holds_only_what_is_its_own():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    own = {
        "name",
        "entrypoint",
        "build",
        "work_pool",
        "parameters",
        "schedules",
        "version",
        "enforce_parameter_schema",
    }
    for deployment in config["deployments"]:
        assert set(deployment) <= own, deployment["name"]
        checked, tag, build = deployment["build"]  # the steps checked as a graph before anything is built
        assert checked == config["definitions"]["check_steps"], deployment["name"]
        assert set(tag["tools/deploy/image_tag.py:image_tag"]) == {"id", "directory"}, deployment["name"]
        assert build["prefect_docker.deployments.steps.build_docker_image"] == config["definitions"]["build_image"]
        assert deployment["work_pool"] in config["definitions"]["pools"], deployment["name"]
        assert deployment["work_pool"]["job_variables"] == {"image": "{{ pinned.image }}"}
    assert "push_docker_image" in str(config["push"]) and "pipeline-registry" in str(config["push"])


def tags(root: Path) -> dict[str, str]:
    return {c: image_tag.content_hash(root / c, [SETTINGS[a] for a in image_tag.BUILD_ARGS]) for c in COMPONENTS}


def copy_of_tree(target: Path, reverse: bool = False) -> Path:
    """The working tree's image inputs, copied file by file (in reverse order if told), with the
    lock files, as another machine's checkout would hold them."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    inputs = [n for n in files if n.split("/")[0] in IMAGE_INPUTS or n in ("component.Dockerfile", ".dockerignore")]
    names = sorted((n for n in inputs if (ROOT / n).is_file()), reverse=reverse)
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, target / name)
    return target


def use_root(monkeypatch, root: Path) -> None:
    monkeypatch.setattr(image_tag, "ROOT", root)
    monkeypatch.setattr(image_tag, "RECIPE", root / "component.Dockerfile")


def test_content_tags_ignore_file_order_times_and_modes(tmp_path, monkeypatch):
    """Another checkout: files written in the other order, at other times, with other modes."""
    expected = tags(ROOT)
    other = copy_of_tree(tmp_path / "other", reverse=True)
    for i, path in enumerate(sorted(p for p in other.rglob("*") if p.is_file())):
        path.chmod(0o600 if i % 2 else 0o755)
        os.utime(path, (1_000_000 + i * 7919, 1_000_000 + i * 7919))
    use_root(monkeypatch, other)
    assert tags(other) == expected


def test_junk_changes_no_tag_and_a_real_change_does(tmp_path, monkeypatch):
    root = copy_of_tree(tmp_path / "repo")
    use_root(monkeypatch, root)
    before = tags(root)
    for component in COMPONENTS:  # what editors, OSes and test runs leave behind
        (root / component / ".DS_Store").write_bytes(b"\0\1")
        (root / component / "__pycache__").mkdir(exist_ok=True)
        (root / component / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
        (root / component / ".pytest_cache").mkdir()
        (root / component / "test_scratch.py").write_text("x = 1\n")
    assert tags(root) == before
    (root / "subflow" / "subflow.py").write_text((root / "subflow" / "subflow.py").read_text() + "\n# a change\n")
    after = tags(root)
    assert after["subflow"] != before["subflow"] and {c: after[c] for c in ("main_flow", "validate")} == {
        c: before[c] for c in ("main_flow", "validate")
    }
    # The kit is in every image: a kit change retags every component.
    (root / "stepkit" / "contract.py").write_text((root / "stepkit" / "contract.py").read_text() + "\n# a kit change\n")
    assert all(tag != after[c] for c, tag in tags(root).items())


def test_the_tag_step_names_missing_settings(monkeypatch):
    monkeypatch.delenv("PREFECT_IMAGE", raising=False)
    monkeypatch.setenv("REGISTRY", "localhost:1")
    monkeypatch.setenv("FLOW_UID", "1")
    with pytest.raises(RuntimeError, match="PREFECT_IMAGE not set: load .env first"):
        image_tag.image_tag("subflow")


def test_every_lock_is_fresh_and_hashed():
    assert (
        subprocess.run([sys.executable, str(ROOT / "tools" / "lock.py"), "--check"], capture_output=True).returncode
        == 0
    )
    for path in [*ROOT.glob("*/requirements.lock"), ROOT / "requirements-dev.lock"]:  # stepkit's too
        pins = lock.pins(path)
        assert pins and all(hashes for _, hashes in pins.values()), path
        assert pins["prefect"][0] == SETTINGS["PREFECT_VERSION"], path  # every image runs .env's Prefect


def test_a_stale_lock_is_caught(tmp_path):
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in (".env", "pyproject.toml", "requirements-dev.lock", "tools", "stepkit", *COMPONENTS, "worker"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, copy / name)
        else:
            shutil.copy(ROOT / name, copy / name)
    with (copy / "subflow" / "requirements.txt").open("a") as file:
        file.write("polars>=1\n")
    # A component pinning a kit package apart from the kit's lock: its layer would reinstall it.
    validate = copy / "validate" / "requirements.lock"
    pyarrow = lock.pins(ROOT / "stepkit" / "requirements.lock")["pyarrow"][0]
    validate.write_text(validate.read_text().replace(f"pyarrow=={pyarrow}", "pyarrow==26.0.0"))
    check = subprocess.run([sys.executable, str(copy / "tools" / "lock.py"), "--check"], capture_output=True, text=True)
    assert check.returncode != 0
    assert "subflow/requirements.lock: polars>=1 is not in the lock" in check.stderr
    assert f"validate/requirements.lock: pyarrow==26.0.0 is not the step kit's pyarrow=={pyarrow}" in check.stderr
    assert "run `make lock`" in check.stderr


def test_the_host_cli_installs_on_every_python_prefect_supports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours, prefects = SpecifierSet(project["requires-python"]), SpecifierSet(metadata("prefect")["Requires-Python"])
    assert ours == prefects, f"requires-python is {ours}; the locked prefect supports {prefects}"


def test_deploy_reads_each_step_s_contract_from_its_source_and_refuses_a_graph_that_cannot_run(tmp_path):
    """tools/deploy/steps.py: the check that is every deployment's first build step, on a copy of prefect.yaml."""
    found = steps.contracts(ROOT / "prefect.yaml")
    assert sorted(found) == ["join/join", "subflow/subflow", "validate/validate"]  # not the main flow, retention
    assert found["join/join"].inputs == ("rows", "groups") and found["subflow/subflow"].inputs == ("data",)
    pipelines = yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["pipelines"]
    assert steps.check_steps(pipelines, str(ROOT / "prefect.yaml")) == {"pipelines": 2, "contracts": 3}
    (tmp_path / "join").mkdir()
    (tmp_path / "join" / "join.py").write_text(
        "@step(requires={'left': {'count': 'int64'}, 'right': {'species': 'string'}})\n"
        "def join(left: Dataset, right: Dataset, out: Out) -> Output: ...\n"
    )
    (tmp_path / "subflow").mkdir()
    (tmp_path / "subflow" / "subflow.py").write_text(
        "@step(produces={'species': 'string'})\ndef subflow(data: Dataset): ...\n"
    )
    deployments = [{"name": n, "entrypoint": f"{n}/{n}.py:{n}"} for n in ("join", "subflow")]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump({"deployments": deployments}))
    graph = ["subflow/subflow", {"step": "join/join", "needs": {"left": "subflow", "right": "subflow"}}]
    edge = r"pipeline p: edge subflow/subflow -> join/join \(input left\): join/join requires column 'count'"
    with pytest.raises(ValueError, match=edge):
        steps.check_steps({"p": graph}, str(tmp_path / "prefect.yaml"))
    inputs = r"pipeline q: step join/join takes the inputs \['left', 'right'\], not \['data'\]"
    with pytest.raises(ValueError, match=inputs):
        steps.check_steps({"q": ["subflow/subflow", "join/join"]}, str(tmp_path / "prefect.yaml"))
    with pytest.raises(ValueError, match=r"pipeline 'Q!': a name of lowercase letters"):
        steps.check_steps({"Q!": ["subflow/subflow"]}, str(tmp_path / "prefect.yaml"))
