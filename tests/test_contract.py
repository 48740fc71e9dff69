"""The main flow's call of the subflow, checked against the subflow's real signature.

No server and no Docker: each side is loaded from its own directory, and the check fails when
they drift, e.g. the main flow passing `data` where the subflow expects `records`.
"""

import csv
import shutil
import typing
from pathlib import Path
from types import ModuleType

import jsonschema
import yaml
from conftest import IRIS, ROOT, load_component
from prefect.utilities.callables import parameter_schema


def contract_violations(main: ModuleType, sub: ModuleType) -> list[str]:
    """Every way in which the main flow's call does not fit the subflow; empty if it fits."""
    problems = []
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entrypoint = f"subflow/subflow.py:{sub.subflow.fn.__name__}"
    names = [d["name"] for d in config["deployments"] if d["entrypoint"] == entrypoint]
    deployments = {f"{sub.subflow.name}/{name}" for name in names}
    if main.SUBFLOW_DEPLOYMENT not in deployments:
        problems.append(f"deployment {main.SUBFLOW_DEPLOYMENT!r} is not one of {deployments}")

    schema = parameter_schema(sub.subflow).model_dump_for_openapi()
    with IRIS.open() as file:
        params = main.subflow_parameters(list(csv.DictReader(file))[:3], "iris.csv")
    unknown = sorted(set(params) - set(schema["properties"]))
    problems += [f"unknown parameter {name!r}" for name in unknown]
    problems += [
        f"parameter {'.'.join(map(str, e.path)) or '(all)'}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(params)
    ]

    returned = typing.get_type_hints(typing.get_type_hints(sub.subflow.fn)["return"])
    for key, kind in main.SUBFLOW_RESULT.items():
        if key not in returned:
            problems.append(f"result key {key!r} is not returned by the subflow")
        elif (typing.get_origin(returned[key]) or returned[key]) is not kind:
            problems.append(f"result key {key!r} is {returned[key]}, the main flow reads {kind}")
    return problems


def test_main_flow_call_fits_the_subflow():
    assert contract_violations(load_component("main_flow"), load_component("subflow")) == []


def test_drift_is_caught(tmp_path: Path):
    """The reference design's bug: the caller passes `data`, the subflow expects `records`."""
    copy = tmp_path / "main_flow"
    shutil.copytree(ROOT / "main_flow", copy)
    code = (copy / "main_flow.py").read_text()
    assert '{"records": records' in code
    (copy / "main_flow.py").write_text(code.replace('{"records": records', '{"data": records'))
    drifted = load_component("main_flow", root=tmp_path)
    problems = contract_violations(drifted, load_component("subflow"))
    assert "unknown parameter 'data'" in problems
    assert any("'records' is a required property" in p for p in problems), problems


def test_result_type_drift_is_caught():
    main = load_component("main_flow")
    main.SUBFLOW_RESULT = {**main.SUBFLOW_RESULT, "rows": str, "checksum": str}
    problems = contract_violations(main, load_component("subflow"))
    assert problems == [
        "result key 'rows' is <class 'int'>, the main flow reads <class 'str'>",
        "result key 'checksum' is not returned by the subflow",
    ]
