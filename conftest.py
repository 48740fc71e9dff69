"""Fixtures shared by every test: the components' unit tests and the e2e tests."""

import csv
import io
import os
from pathlib import Path

import fsspec
import pytest
from dotenv import dotenv_values
from fsspec.implementations.local import LocalFileSystem
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.testing.utilities import prefect_test_harness

# Prefect reads PREFECT_API_URL from .env in the working directory: the user's stack. No test
# may reach it by accident, so point the default nowhere; tests use a temporary server
# (`prefect_api`) or a stack of their own (tests/conftest.py, `stack`).
os.environ["PREFECT_API_URL"] = "http://127.0.0.1:9/api"

ROOT = Path(__file__).resolve().parent
# The bounds the main flow reads from its environment (main_flow/bounds.py), as .env sets them.
for name, value in dotenv_values(ROOT / ".env").items():
    if name.startswith("MAX_"):
        os.environ.setdefault(name, value or "")
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


def iris_rows() -> list[dict[str, str]]:
    with IRIS.open() as file:
        return list(csv.DictReader(file))


def to_csv(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    """Main run r1's directory in a file data store at tmp_path (PIPELINE_DATA_URL): where a step
    called in a test may read and write (the kit refuses anything else)."""
    monkeypatch.setenv("PIPELINE_DATA_URL", f"file://{tmp_path}")
    (path := tmp_path / "runs" / "r1").mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary local Prefect server and database for flow-level unit tests; in a suite that a
    test runs inside its own (tests/test_scaffold.py), that test's (PIPELINE_TEST_API_URL)."""
    if url := os.environ.get("PIPELINE_TEST_API_URL"):
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
        return
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


class CountingFileSystem(LocalFileSystem):
    """The local file system as `counted://`, counting opens for reading and bytes read: how
    often a step reads its input."""

    protocol = "counted"
    opens = 0
    bytes_read = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("counted://"))

    def _open(self, path, mode="rb", **kwargs):
        file = super()._open(path, mode, **kwargs)
        if "r" in mode:
            CountingFileSystem.opens += 1
            read = file.read

            def counted(*args, **kw):
                data = read(*args, **kw)
                CountingFileSystem.bytes_read += len(data)
                return data

            file.read = counted
        return file


fsspec.register_implementation("counted", CountingFileSystem, clobber=True)
