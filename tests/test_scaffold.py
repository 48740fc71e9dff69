"""The scaffold's component as `make component` writes it: about 15 lines of logic that fit the
contract, and a unit test that passes. No Docker; the e2e suite deploys and runs one."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.settings import PREFECT_API_URL

from tests.harness import ROOT, project_copy

sys.path.insert(0, str(ROOT / "tools"))
import component  # noqa: E402

from tests import test_contract  # noqa: E402

# The generated test asks for `prefect_api` (here, the server this test already runs) and
# `run_dir` (as the repository's conftest.py has it).
CONFTEST = """import pytest


@pytest.fixture
def prefect_api():
    yield


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_DATA_URL", f"file://{tmp_path}")
    (path := tmp_path / "runs" / "r1").mkdir(parents=True)
    return path
"""


def scaffolded(root: Path, name: str = "enrich", inputs: list[str] | None = None) -> Path:
    """The component's flow and test as the scaffold writes them (its lock is `make lock`'s)."""
    directory = root / name
    directory.mkdir(parents=True)
    for file, text in component.files(name, inputs or []).items():
        (directory / file).write_text(text)
    (root / "conftest.py").write_text(CONFTEST)
    return directory


@pytest.mark.parametrize("inputs", [[], ["rows:validate", "groups:subflow"]])
def test_the_scaffolded_step_is_about_fifteen_lines_and_fits_the_contract(tmp_path, inputs):
    code = scaffolded(tmp_path, inputs=inputs) / "enrich.py"
    assert len(code.read_text().splitlines()) <= 15
    module = test_contract.load(code)
    assert module.enrich.contract.inputs == (tuple(i.split(":")[0] for i in inputs) or ("data",))
    assert test_contract.violations(test_contract.stepkit.contract, module, "enrich", {}) == []


@pytest.mark.parametrize(("inputs", "passed"), [([], "2 passed"), (["rows:validate", "groups:subflow"], "1 passed")])
def test_the_scaffolded_unit_test_passes(prefect_api, tmp_path, inputs, passed):
    directory = scaffolded(tmp_path, inputs=inputs)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib", str(directory)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and passed in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_the_scaffold_adds_the_step_to_the_end_of_the_pipeline():
    """To whatever the pipeline lists (the README's own enrich included), nothing else changed."""
    text = (ROOT / "prefect.yaml").read_text()
    before = yaml.safe_load(text)
    after = yaml.safe_load(component.add_step(text, "probe_added/probe_added"))
    main = before["definitions"]["pipelines"]["main"]
    assert after["definitions"]["pipelines"] == {
        **before["definitions"]["pipelines"],
        "main": [*main, "probe_added/probe_added"],
    }
    own = [{**d, "build": d["build"][1:]} for d in before["deployments"]]  # less the check, which reads every pipeline
    assert [{**d, "build": d["build"][1:]} for d in after["deployments"]] == own


def test_the_readmes_first_edit_keeps_the_unit_suite_green(tmp_path, prefect_api):
    """`make component NAME=enrich` (README *Adding a component*) in a copy of the repository, then
    there the unit tests that read prefect.yaml, and enrich's own: all pass (on this suite's
    temporary Prefect server: a second one takes half a minute to start)."""
    project = project_copy(tmp_path)
    shutil.copytree(ROOT / "tests", project / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("conftest.py", "pyproject.toml"):
        shutil.copy(ROOT / name, project / name)
    made = subprocess.run([sys.executable, "tools/component.py", "enrich"], cwd=project, capture_output=True, text=True)
    assert made.returncode == 0 and "steps end with enrich/enrich" in made.stdout, made.stdout + made.stderr
    this = f"tests/test_scaffold.py::{test_the_readmes_first_edit_keeps_the_unit_suite_green.__name__}"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "not e2e", "--deselect", this,
         "tests/test_contract.py", "tests/test_scaffold.py", "enrich"],
        cwd=project, env={**os.environ, "PYTHONPATH": str(project), "PIPELINE_TEST_API_URL": prefect_api},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    ran = proc.stdout
    assert proc.returncode == 0, ran[-3000:] + proc.stderr[-3000:]
    assert "test_every_step_fits_the_contract[enrich/enrich] PASSED" in ran and "enrich/test_enrich.py::" in ran, ran[
        -3000:
    ]
