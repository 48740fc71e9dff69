"""Every step in prefect.yaml's pipeline, checked against the step kit's contract; and a step
built with the kit, run for real, round-trips a reference.

No Docker: each component is loaded from its own directory, and the check runs over whatever
prefect.yaml lists, so a new component is checked without a test of its own.
"""

import importlib.util
import sys
import typing
from pathlib import Path
from types import ModuleType

import jsonschema
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet
import pytest
import typing_extensions
import yaml
from prefect.utilities.callables import parameter_schema

import stepkit
from conftest import ROOT, CountingFileSystem
from stepkit import WIRE, Dataset, Out, Output, RunLayout, step, verify, write_parquet
from stepkit.graph import graph_of
from tests.harness import iris_like, project_copy

SAMPLE = {
    "wire": WIRE,
    "uri": "s3://bucket/runs/1/input.parquet",
    "rows": 3,
    "columns": ["a"],
    "bytes": 9,
    "sha256": "0" * 64,
}


def load(path: Path) -> ModuleType:
    """A component's flow module, loaded from its file as its container loads it."""
    spec = importlib.util.spec_from_file_location(f"contract_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pipeline(root: Path = ROOT) -> tuple[ModuleType, dict[str, tuple[ModuleType, str, dict]]]:
    """The step kit's contract, and each step's module and deployment from prefect.yaml."""
    config = yaml.safe_load((root / "prefect.yaml").read_text())
    by_name = {}
    for deployment in config["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        module = load(root / path)
        by_name[f"{getattr(module, function).name}/{deployment['name']}"] = (module, function, deployment)
    names = dict.fromkeys(name for steps in config["definitions"]["pipelines"].values() for name in graph_of(steps))
    return stepkit.contract, {name: by_name[name] for name in names}


def kind_of(hint: typing.Any) -> type:
    """The runtime type a hint gives in JSON: a TypedDict is a dict, list[int] a list."""
    return dict if typing_extensions.is_typeddict(hint) else typing.get_origin(hint) or hint


def violations(contract: ModuleType, module: ModuleType, function: str, deployment: dict) -> list[str]:
    """Every way in which a step does not fit the contract; empty if it fits."""
    flow = getattr(module, function)
    problems = []
    schema = parameter_schema(flow).model_dump_for_openapi()
    # What the main flow passes, on top of the deployment's own parameters from prefect.yaml.
    inputs = getattr(flow, "contract", stepkit.Contract()).inputs
    params = {**deployment.get("parameters", {}), **dict.fromkeys(inputs, SAMPLE), "out": "s3://bucket/runs/1/step"}
    problems += [
        f"parameter {'.'.join(map(str, e.path)) or '(all)'}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(params)
    ]
    problems += [f"parameter {name!r} is not accepted" for name in sorted(set(params) - set(schema["properties"]))]
    returned = typing.get_type_hints(typing.get_type_hints(flow.fn)["return"])
    for key, kind in contract.STEP_RESULT.items():
        if key not in returned:
            problems.append(f"result key {key!r} is not returned")
        elif kind_of(returned[key]) is not kind:
            problems.append(f"result key {key!r} is {returned[key]}, the main flow reads {kind}")
    if "output" in returned and typing.get_type_hints(returned["output"]) != typing.get_type_hints(contract.DataRef):
        problems.append("its output DataRef differs from the kit's")
    return problems


def test_every_listed_step_names_a_deployment():
    """Whatever steps prefect.yaml's pipelines list (a component added by the README's way included)."""
    pipelines = yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["pipelines"]
    listed = dict.fromkeys(name for steps in pipelines.values() for name in graph_of(steps))
    _, steps = pipeline()  # a step without a deployment is a KeyError naming it
    assert listed and list(steps) == list(listed)


@pytest.mark.parametrize("name", list(pipeline()[1]))
def test_every_step_fits_the_contract(name):
    contract, steps = pipeline()
    assert violations(contract, *steps[name]) == []


@pytest.mark.parametrize(
    "name", [n for n, (m, f, _) in pipeline()[1].items() if getattr(m, f).contract.inputs == ("data",)]
)
def test_every_step_reads_its_input_once(prefect_api, name, tmp_path, monkeypatch):
    """Opened once, each byte fetched once (a real run of the step on 200,000 rows in 8 row groups).
    Not a step of several inputs, whose inputs must fit each other: join/test_join.py runs join."""
    module, function, deployment = pipeline()[1][name]
    table = iris_like(200_000)
    table = table.set_column(4, "species", table["species"].cast(pa.string()))  # as ingest writes it
    ref = write_parquet(table, f"file://{tmp_path}/runs/r1/input.parquet", row_group_size=25_000)
    CountingFileSystem.opens = CountingFileSystem.bytes_read = 0
    monkeypatch.setenv("PIPELINE_DATA_URL", f"counted://{tmp_path}")  # the store, behind counted://
    counted, out = {**ref, "uri": f"counted://{tmp_path}/runs/r1/input.parquet"}, f"counted://{tmp_path}/runs/r1/out"
    result = getattr(module, function)(data=counted, out=out, **deployment.get("parameters", {}))
    assert result["summary"]
    assert CountingFileSystem.opens == 1
    assert ref["bytes"] <= CountingFileSystem.bytes_read <= ref["bytes"] + 1024


HAND_WRITTEN = """
from prefect import flow
from typing_extensions import TypedDict


class Result(TypedDict):
    output: dict
    summary: list


@flow(name="subflow")
def subflow(records: dict, out: str) -> Result:
    return Result(output=records, summary=[])
"""


def test_drift_is_caught(tmp_path: Path):
    """A step written without the kit that renames `data` and returns no `report` does not fit."""
    project_copy(tmp_path)  # every step the pipeline lists, a user's own included
    (tmp_path / "subflow" / "subflow.py").write_text(HAND_WRITTEN)
    contract, steps = pipeline(tmp_path)
    problems = violations(contract, *steps["subflow/subflow"])
    assert "parameter (all): 'records' is a required property" in problems
    assert "parameter 'data' is not accepted" in problems
    assert "result key 'report' is not returned" in problems


def test_result_type_drift_is_caught(monkeypatch):
    contract, steps = pipeline()
    monkeypatch.setattr(contract, "STEP_RESULT", {**contract.STEP_RESULT, "report": dict, "checksum": str})
    problems = violations(contract, *steps["validate/validate"])
    assert problems == [
        "result key 'report' is <class 'str'>, the main flow reads <class 'dict'>",
        "result key 'checksum' is not returned",
    ]


@step
def double(data: Dataset, out: Out, factor: int = 2) -> Output:
    """A fake step built with the kit: every value times `factor`."""
    table = pa.Table.from_batches(list(data.batches()))
    doubled = pa.table({name: pa.compute.multiply(table[name], factor) for name in table.column_names})
    return Output(
        out.write_table(doubled, "doubled.parquet"), [{"rows": doubled.num_rows}], "doubled", {"factor": factor}
    )


def test_a_step_built_with_the_kit_round_trips_a_reference(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_DATA_URL", f"file://{tmp_path}")
    layout = RunLayout.of("run-1")
    first = double(data=write_parquet(pa.table({"x": [1, 2, 3]}), layout.input), out=layout.step("double/double"))
    assert violations(stepkit.contract, sys.modules[__name__], "double", {"parameters": {"factor": 3}}) == []
    assert first["output"]["uri"] == f"{layout.dir}/double/doubled.parquet" and first["factor"] == 2
    verify(first["output"])  # a complete, hashed reference of the kit's wire format
    second = double(data=first["output"], out=layout.step("again/again"), factor=5)  # the next step reads it
    assert pa.parquet.read_table(second["output"]["uri"].removeprefix("file://"))["x"].to_pylist() == [10, 20, 30]
    assert {"report", "image", "summary", "peak_rss_bytes", "cpu_seconds"} <= set(second)
