"""Scaffold a pipeline component: its directory, its deployment and its place in the pipeline.

    python tools/component.py enrich      # make component NAME=enrich

Creates enrich/ (a step built with the step kit, requirements.txt and its lock, and a unit
test), appends enrich's deployment to prefect.yaml and adds enrich/enrich to the end of the
pipeline's steps. Refuses a name that is taken. Then edit the flow and deploy it: `docker compose
run --rm cli prefect deploy --name enrich`, which also registers the new steps.
"""

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

FLOW = '''"""{name}: a pipeline step. Its logic only: the step kit (stepkit/) does the contract."""

from stepkit import Dataset, Output, step


@step
def {name}(data: Dataset) -> Output:
    """Summarise `data` and pass it on; add parameters of your own after `data`, and take
    `out: Out` to write outputs (`out.write_table(table, "name.parquet")` returns their reference)."""
    rows = sum(batch.num_rows for batch in data.batches())
    summary = [{{"rows": rows, "columns": len(data.ref["columns"])}}]
    report = f"### {name}: {{rows}} rows from `{{data.ref['uri']}}`\\n"
    return Output(data.ref, summary, report)
'''

TEST = '''"""Unit tests of the {name} component, without Docker: its flow on a real Parquet file."""

import pyarrow as pa
import pytest
from stepkit import DataRef, write_parquet

from {name} import {name} as component


@pytest.fixture
def stored(run_dir) -> DataRef:
    return write_parquet(pa.table({{"a": [1, 2, 3]}}), f"file://{{run_dir}}/input.parquet")


def test_passes_valid_data_on(prefect_api, stored, run_dir):
    result = component.{name}(data=stored, out=f"file://{{run_dir}}/{name}")
    assert result["output"] == stored and result["summary"] == [{{"rows": 3, "columns": 1}}]


def test_refuses_a_corrupt_object(prefect_api, stored, run_dir):
    corrupt = {{**stored, "sha256": "0" * 64}}
    state = component.{name}(data=corrupt, out=f"file://{{run_dir}}/{name}", return_state=True)
    assert state.is_failed()
'''

REQUIREMENTS = """# {name}'s own dependencies beyond the base image's prefect and the step kit's; `make lock` pins them.
"""


DEPLOYMENT = """
  - <<: *component
    name: {name}
    entrypoint: {name}/{name}.py:{name}
    build:
      - tools/deploy/image_tag.py:image_tag: {{id: component, directory: {name}}}
      - prefect_docker.deployments.steps.build_docker_image: *build_image
    work_pool: *subflow_pool
"""


def add_step(text: str, step: str) -> str:
    """prefect.yaml's text with `step` appended to the pipeline's steps (`definitions.steps`)."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == "steps: &steps")
    end = start + 1
    while end < len(lines) and (lines[end].strip().startswith("- ") or lines[end].strip().startswith("#")):
        end += 1
    indent = re.match(r"\s*", lines[end - 1]).group()
    return "".join([*lines[:end], f"{indent}- {step}\n", *lines[end:]])


def scaffold(name: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        sys.exit(f"error: {name!r} is not a component name: lowercase letters, digits and _, a letter first")
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    if (ROOT / name).exists() or name in [d["name"] for d in config["deployments"]]:
        sys.exit(f"error: {name!r} is taken: {ROOT / name} or a deployment of that name exists")
    text = add_step((ROOT / "prefect.yaml").read_text(), f"{name}/{name}") + DEPLOYMENT.format(name=name)
    steps = yaml.safe_load(text)["definitions"]["steps"]
    assert steps[-1] == f"{name}/{name}", steps  # where every deploy registers the pipeline from
    directory = ROOT / name
    directory.mkdir()
    try:
        (directory / f"{name}.py").write_text(FLOW.format(name=name))
        (directory / f"test_{name}.py").write_text(TEST.format(name=name))
        (directory / "requirements.txt").write_text(REQUIREMENTS.format(name=name))
        subprocess.run([sys.executable, str(ROOT / "tools" / "lock.py"), "--only", name], check=True)
    except BaseException:
        shutil.rmtree(directory)  # all or nothing: prefect.yaml is written only after this
        raise
    (ROOT / "prefect.yaml").write_text(text)
    print(f"created {name}/ and its deployment; the pipeline's steps end with {name}/{name}.")
    print(
        f"Next: edit {name}/{name}.py, then: docker compose run --rm cli prefect deploy --name {name}\n"
        "(any deploy registers prefect.yaml's steps: the next pipeline run includes it)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the component's directory, flow and deployment name")
    scaffold(parser.parse_args().name)


if __name__ == "__main__":
    main()
