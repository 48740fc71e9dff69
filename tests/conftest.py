"""Shared test helpers: load each component from its own directory, never by cross-import."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from e2e import stack  # noqa: F401  (the session-wide Docker stack fixture)
from prefect.testing.utilities import prefect_test_harness

ROOT = Path(__file__).resolve().parent.parent
IRIS = ROOT / "main_flow" / "data" / "iris.csv"

# Means of the shipped Iris data per species (Fisher, 1936), computed independently of the flows.
IRIS_SETOSA = {
    "species": "setosa",
    "count": 50,
    "mean_sepal_length": 5.006,
    "mean_sepal_width": 3.428,
    "mean_petal_length": 1.462,
    "mean_petal_width": 0.246,
}


def load_component(name: str, root: Path = ROOT) -> ModuleType:
    """Import `<root>/<name>/<name>.py` as a module of its own, the way its container sees it."""
    path = root / name / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"component_{name}", path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary local Prefect server and database for flow-level unit tests."""
    with prefect_test_harness(server_startup_timeout=120):
        yield
