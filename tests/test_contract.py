"""Every step in prefect.yaml's pipeline, checked against the main flow's step contract.

No server and no Docker: each component is loaded from its own directory, and the check runs
over whatever prefect.yaml lists, so a new component is checked without a test of its own.
"""

import importlib.util
import shutil
import typing
from pathlib import Path
from types import ModuleType

import jsonschema
import pytest
import typing_extensions
import yaml
from prefect.utilities.callables import parameter_schema

from conftest import ROOT

SAMPLE = {
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
    """The main flow module, and each step's module and deployment from prefect.yaml."""
    config = yaml.safe_load((root / "prefect.yaml").read_text())
    by_name = {}
    for deployment in config["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        module = load(root / path)
        by_name[f"{getattr(module, function).name}/{deployment['name']}"] = (module, function, deployment)
    main_module = by_name["main-flow/main"][0]
    steps = by_name["main-flow/main"][2]["parameters"]["steps"]
    names = [name for step in steps for name in (step if isinstance(step, list) else [step])]
    return main_module, {name: by_name[name] for name in names}


def kind_of(hint: typing.Any) -> type:
    """The runtime type a hint gives in JSON: a TypedDict is a dict, list[int] a list."""
    return dict if typing_extensions.is_typeddict(hint) else typing.get_origin(hint) or hint


def violations(main: ModuleType, module: ModuleType, function: str, deployment: dict) -> list[str]:
    """Every way in which a step does not fit the main flow's contract; empty if it fits."""
    flow = getattr(module, function)
    problems = []
    schema = parameter_schema(flow).model_dump_for_openapi()
    # What the main flow passes, on top of the deployment's own parameters from prefect.yaml.
    params = {**deployment.get("parameters", {}), "data": SAMPLE, "out": "s3://bucket/runs/1/step"}
    problems += [
        f"parameter {'.'.join(map(str, e.path)) or '(all)'}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(params)
    ]
    problems += [f"parameter {name!r} is not accepted" for name in sorted(set(params) - set(schema["properties"]))]
    returned = typing.get_type_hints(typing.get_type_hints(flow.fn)["return"])
    for key, kind in main.STEP_RESULT.items():
        if key not in returned:
            problems.append(f"result key {key!r} is not returned")
        elif kind_of(returned[key]) is not kind:
            problems.append(f"result key {key!r} is {returned[key]}, the main flow reads {kind}")
    if "output" in returned and typing.get_type_hints(returned["output"]) != typing.get_type_hints(main.DataRef):
        problems.append("its output DataRef differs from the main flow's")
    return problems


def test_the_pipeline_has_steps_and_a_parallel_group_is_allowed():
    main, steps = pipeline()
    assert list(steps) == ["validate/validate", "subflow/subflow"]
    assert main.step_groups([["validate/validate", "subflow/subflow"]]) == [["validate/validate", "subflow/subflow"]]


@pytest.mark.parametrize("step", list(pipeline()[1]))
def test_every_step_fits_the_contract(step):
    main, steps = pipeline()
    assert violations(main, *steps[step]) == []


def test_drift_is_caught(tmp_path: Path):
    """A step that renames `data` and drops `report` from its result no longer fits."""
    for name in ("prefect.yaml", "main_flow", "validate", "subflow"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tmp_path / name)
    code = tmp_path / "subflow" / "subflow.py"
    text = code.read_text()
    assert "def subflow(data: DataRef," in text and "    report: str\n" in text
    code.write_text(
        text.replace("def subflow(data: DataRef,", "def subflow(records: DataRef,").replace("    report: str\n", "")
    )
    main, steps = pipeline(tmp_path)
    problems = violations(main, *steps["subflow/subflow"])
    assert "parameter (all): 'records' is a required property" in problems
    assert "parameter 'data' is not accepted" in problems
    assert "result key 'report' is not returned" in problems


def test_result_type_drift_is_caught():
    main, steps = pipeline()
    main.STEP_RESULT = {**main.STEP_RESULT, "report": dict, "checksum": str}
    problems = violations(main, *steps["validate/validate"])
    assert problems == [
        "result key 'report' is <class 'str'>, the main flow reads <class 'dict'>",
        "result key 'checksum' is not returned",
    ]
