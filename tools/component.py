"""Scaffold a pipeline component: its directory, its deployment and its place in the pipeline.

    python tools/component.py enrich      # make component NAME=enrich

Creates enrich/ (a flow stub that keeps the step contract, requirements.txt and its lock, and
a unit test), appends enrich's deployment to prefect.yaml and adds
enrich/enrich to the end of the pipeline's steps. Refuses a name that is taken. Then edit the
flow and deploy it: `docker compose run --rm cli prefect deploy --name enrich`.
"""

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

FLOW = '''"""{name}: a pipeline step. It takes a stored dataset by reference and returns the step contract."""

import hashlib
import os
import resource
from typing import Any

import fsspec
from prefect import flow, get_client
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from typing_extensions import TypedDict  # pydantic needs it for parameters on Python 3.11


class DataRef(TypedDict):
    """A complete object in the data store, and what it holds."""

    uri: str
    rows: int
    columns: list[str]
    bytes: int
    sha256: str


class StepResult(TypedDict):
    """What callers get back: the step contract."""

    output: DataRef
    summary: list[dict[str, Any]]
    report: str
    image: str
    peak_rss_bytes: int
    cpu_seconds: float


@flow(name="{name}", persist_result=True, result_serializer="json")
def {name}(data: DataRef, out: str) -> StepResult:
    """Check `data` and pass it on; write new outputs under `out` and return their DataRef."""
    image = tag_run_with_image()
    verify(data)
    summary = [{{"rows": data["rows"], "columns": len(data["columns"])}}]
    report = f"### {name}: {{data['rows']}} rows from `{{data['uri']}}`\\n"
    create_markdown_artifact(key="{key}-report", markdown=report, description=data["uri"])
    return StepResult(output=data, summary=summary, report=report, image=image, **usage())


def verify(ref: DataRef) -> None:
    """Fail unless the stored object exists and matches its reference byte for byte."""
    fs, path = fsspec.core.url_to_fs(ref["uri"])
    if not fs.exists(path):
        raise FileNotFoundError(f"stored object missing: {{ref['uri']}}")
    digest = hashlib.sha256()
    with fs.open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != ref["sha256"]:
        raise ValueError(f"stored object corrupt: {{ref['uri']}} does not match its sha256")


def usage() -> dict[str, Any]:
    """This process's peak memory and CPU time: what the run cost."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {{"peak_rss_bytes": own.ru_maxrss * 1024, "cpu_seconds": round(own.ru_utime + own.ru_stime, 3)}}


def tag_run_with_image() -> str:
    """Tag this run with the image it runs in (set by the work pool): the UI shows what ran."""
    image = os.environ.get("COMPONENT_IMAGE", "unknown")
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=[*flow_run.tags, f"image:{{image}}"])
    return image
'''

TEST = '''"""Unit tests of the {name} component, without Docker."""

import hashlib

import pytest

from {name} import {name} as component


@pytest.fixture
def stored(tmp_path) -> component.DataRef:
    path = tmp_path / "input.parquet"
    path.write_bytes(b"stand-in bytes: {name} only verifies them")
    return component.DataRef(
        uri=f"file://{{path}}", rows=3, columns=["a"], bytes=path.stat().st_size,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )  # fmt: skip


def test_passes_valid_data_on(prefect_api, stored, tmp_path):
    result = component.{name}(stored, f"file://{{tmp_path}}/{name}")
    assert result["output"] == stored and result["summary"] == [{{"rows": 3, "columns": 1}}]


def test_refuses_a_corrupt_object(prefect_api, stored, tmp_path):
    corrupt = {{**stored, "sha256": "0" * 64}}
    assert component.{name}(corrupt, f"file://{{tmp_path}}/{name}", return_state=True).is_failed()
'''

REQUIREMENTS = """# {name}'s own dependencies beyond the base image's prefect; `make lock` pins them.
s3fs  # fsspec's S3 file system, for an s3:// data store
"""


DEPLOYMENT = """
  - <<: *component
    name: {name}
    entrypoint: {name}/{name}.py:{name}
    build:
      - tools/image_tag.py:image_tag: {{id: component, directory: {name}}}
      - prefect_docker.deployments.steps.build_docker_image: *build_image
    work_pool: *subflow_pool
"""


def add_step(text: str, step: str) -> str:
    """prefect.yaml's text with `step` appended to the main deployment's steps list."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == "steps:")
    end = start + 1
    while end < len(lines) and (lines[end].strip().startswith("- ") or lines[end].strip().startswith("#")):
        end += 1
    indent = re.match(r"\s*", lines[end - 1]).group()
    return "".join([*lines[:end], f"{indent}- {step}\n", *lines[end:]])


def scaffold(name: str, root: Path = ROOT) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        sys.exit(f"error: {name!r} is not a component name: lowercase letters, digits and _, a letter first")
    config = yaml.safe_load((root / "prefect.yaml").read_text())
    if (root / name).exists() or name in [d["name"] for d in config["deployments"]]:
        sys.exit(f"error: {name!r} is taken: {root / name} or a deployment of that name exists")
    text = add_step((root / "prefect.yaml").read_text(), f"{name}/{name}") + DEPLOYMENT.format(name=name)
    main = next(d for d in yaml.safe_load(text)["deployments"] if "steps" in d.get("parameters", {}))
    assert main["parameters"]["steps"][-1] == f"{name}/{name}", main  # where the pipeline reads it
    directory = root / name
    directory.mkdir()
    try:
        (directory / f"{name}.py").write_text(FLOW.format(name=name, key=name.replace("_", "-")))
        (directory / f"test_{name}.py").write_text(TEST.format(name=name))
        (directory / "requirements.txt").write_text(REQUIREMENTS.format(name=name))
        subprocess.run([sys.executable, str(root / "tools" / "lock.py"), "--only", name], check=True)
    except BaseException:
        shutil.rmtree(directory)  # all or nothing: prefect.yaml is written only after this
        raise
    (root / "prefect.yaml").write_text(text)
    print(f"created {name}/ and its deployment; the pipeline's steps end with {name}/{name}.")
    print(f"Next: edit {name}/{name}.py, then: docker compose run --rm cli prefect deploy --name {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the component's directory, flow and deployment name")
    scaffold(parser.parse_args().name)


if __name__ == "__main__":
    main()
