"""Scaffold a pipeline component: its directory, its deployment and its place in the pipeline.

    python tools/component.py enrich                              # make component NAME=enrich
    python tools/component.py report --inputs rows:validate,groups:subflow   # INPUTS=rows:validate,...

Creates enrich/ (a step built with the step kit, requirements.txt and its lock, and a unit
test), appends enrich's deployment to prefect.yaml and adds enrich/enrich to the end of the
main pipeline's steps. Refuses a name that is taken. Then edit the flow and deploy it: `docker compose
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

FLOW_INPUTS = '''"""{name}: a step of several inputs. Its logic only: the step kit (stepkit/) does the contract."""

from stepkit import Dataset, Output, step


@step
def {name}({signature}) -> Output:
    """Count each input's rows and pass `{first}` on. Each input is the output of a step (`needs`
    in prefect.yaml); `@step(requires={{"{first}": {{"a": "int64"}}}})` declares the columns an
    input requires."""
    summary = [{{name: data.ref["rows"] for name, data in {by_name}.items()}}]
    return Output({first}.ref, summary, f"### {name}: {{summary[0]}}\\n")
'''

TEST_INPUTS = '''"""Unit tests of the {name} component, without Docker: its flow on real Parquet files."""

import pyarrow as pa
import pytest
from stepkit import DataRef, write_parquet

from {name} import {name} as component


@pytest.fixture
def stored(run_dir) -> DataRef:
    return write_parquet(pa.table({{"a": [1, 2, 3]}}), f"file://{{run_dir}}/input.parquet")


def test_counts_each_input_and_passes_the_first_on(prefect_api, stored, run_dir):
    result = component.{name}({given}, out=f"file://{{run_dir}}/{name}")
    assert result["output"] == stored and result["summary"] == [{counted}]
'''

REQUIREMENTS = """# {name}'s own dependencies beyond the base image's prefect and the step kit's; `make lock` pins them.
"""


DEPLOYMENT = """
  - <<: *component
    name: {name}
    entrypoint: {name}/{name}.py:{name}
    build:
      - *check_steps
      - tools/deploy/image_tag.py:image_tag: {{id: component, directory: {name}}}
      - prefect_docker.deployments.steps.build_docker_image: *build_image
    work_pool: *subflow_pool
"""


def add_step(text: str, step: str) -> str:
    """prefect.yaml's text with `step` appended to the main pipeline's steps (`definitions.pipelines.main`)."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == "main: &steps")
    end = start + 1
    while end < len(lines) and (lines[end].strip().startswith("- ") or lines[end].strip().startswith("#")):
        end += 1
    while lines[end - 1].strip().startswith("#"):  # after its last step, not a comment on the next pipeline
        end -= 1
    indent = re.match(r"\s*", lines[end - 1]).group()
    return "".join([*lines[:end], f"{indent}- {step}\n", *lines[end:]])


def files(name: str, needs: list[str]) -> dict[str, str]:
    """The component's flow and its unit test: of one input (`data`), or of several, each
    `input:step` of `needs` by its input's name."""
    inputs = [need.split(":")[0] for need in needs]
    if not inputs:
        return {f"{name}.py": FLOW.format(name=name), f"test_{name}.py": TEST.format(name=name)}
    flow = FLOW_INPUTS.format(
        name=name, first=inputs[0], signature=", ".join(f"{i}: Dataset" for i in inputs),
        by_name="{" + ", ".join(f'"{i}": {i}' for i in inputs) + "}",
    )  # fmt: skip
    test = TEST_INPUTS.format(
        name=name, given=", ".join(f"{i}=stored" for i in inputs),
        counted="{" + ", ".join(f'"{i}": 3' for i in inputs) + "}",
    )  # fmt: skip
    return {f"{name}.py": flow, f"test_{name}.py": test}


def scaffold(name: str, needs: list[str]) -> None:
    """`needs`: for a step of several inputs, each `input:step` (or `step`, an input named after it)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        sys.exit(f"error: {name!r} is not a component name: lowercase letters, digits and _, a letter first")
    needs = [need if ":" in need else f"{need}:{need}" for need in needs]
    if bad := [
        n for n in needs if not re.fullmatch(r"[a-z][a-z0-9_]*:[\w./-]+", n) or n.split(":")[0] in ("data", "out")
    ]:
        sys.exit(f"error: inputs {bad}: each input:step, the input lowercase and not data or out")
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    if (ROOT / name).exists() or name in [d["name"] for d in config["deployments"]]:
        sys.exit(f"error: {name!r} is taken: {ROOT / name} or a deployment of that name exists")
    mapping = ", ".join(need.replace(":", ": ") for need in needs)
    step = f"{{step: {name}/{name}, needs: {{{mapping}}}}}" if needs else f"{name}/{name}"
    text = add_step((ROOT / "prefect.yaml").read_text(), step) + DEPLOYMENT.format(name=name)
    steps = yaml.safe_load(text)["definitions"]["pipelines"]["main"]
    assert steps[-1] == yaml.safe_load(step), steps  # where every deploy registers the pipeline from
    directory = ROOT / name
    directory.mkdir()
    try:
        for file, text_of in files(name, needs).items():
            (directory / file).write_text(text_of)
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
    parser.add_argument("--inputs", default="", help="a step of several inputs, e.g. rows:validate,groups:subflow")
    args = parser.parse_args()
    scaffold(args.name, [need for need in args.inputs.split(",") if need])


if __name__ == "__main__":
    main()
