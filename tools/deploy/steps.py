"""`prefect deploy` steps: the pipelines, declared once in prefect.yaml (`definitions.pipelines`,
each named after its main-flow deployment), checked as graphs before anything is built, then
saved as the Variables their main-flow runs read when given no `steps`.

    build:
      - tools/deploy/steps.py:check_steps: {pipelines: *pipelines}       # first, in every deployment
    push:
      - tools/deploy/steps.py:register_steps: {pipelines: *pipelines}    # on every deploy

So `prefect deploy --name enrich` after `make component NAME=enrich` is enough for the next run
of each pipeline that lists enrich to include it, and an edit of a pipeline's steps alone
reaches its next run with `prefect deploy --name main` (main's image is unchanged, so nothing is
built). A deploy registers only the pipelines this prefect.yaml declares: another checkout's stay.
"""

import ast
import re
from pathlib import Path
from typing import TypedDict

import yaml
from prefect.variables import Variable
from pydantic import TypeAdapter, ValidationError

from stepkit import DATA, Contract, Steps, steps_variable
from stepkit.contract import PIPELINE_NAME
from stepkit.graph import GraphError, check, graph_of


class Registered(TypedDict):
    pipelines: dict[str, Steps]


def parsed(pipelines: dict[str, list]) -> dict[str, Steps]:
    """Each pipeline's steps, or an error naming the pipeline and what is wrong with them."""
    found = {}
    for name, steps in pipelines.items():
        if not re.fullmatch(PIPELINE_NAME, name):
            raise ValueError(f"pipeline {name!r}: a name of lowercase letters, digits, - and _ (it names a Variable)")
        try:
            found[name] = TypeAdapter(Steps).validate_python(steps)
        except ValidationError as exc:
            raise ValueError(f"pipeline {name}: its steps {steps} are not a pipeline ({exc})") from exc
    return found


def check_steps(pipelines: dict[str, list], config: str = "prefect.yaml") -> dict[str, int]:
    """Refuse a pipeline that is not a graph whose every edge gives what its consumer requires
    (stepkit/graph.py), each step's contract read from its component in `config`."""
    found = contracts(Path(config))
    for name, steps in parsed(pipelines).items():
        try:
            check(graph_of(steps), found)
        except GraphError as exc:
            raise GraphError(f"pipeline {name}: {exc}") from None
    return {"pipelines": len(pipelines), "contracts": len(found)}


def register_steps(pipelines: dict[str, list]) -> Registered:
    """Save each pipeline's steps as the Variable its main-flow runs read, where they changed."""
    checked = parsed(pipelines)
    for name, steps in checked.items():
        if Variable.get(steps_variable(name), _sync=True) != steps:
            Variable.set(steps_variable(name), steps, overwrite=True, _sync=True)
    return Registered(pipelines=checked)


def contracts(config: Path) -> dict[str, Contract]:
    """The contract of each step deployed from `config`, by step name, read from its source: its
    `Dataset` parameters and what its `@step(...)` declares. Not imported: the deploying image
    need not hold a component's libraries."""
    found = {}
    for deployment in yaml.safe_load(config.read_text())["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        tree = ast.parse((config.parent / path).read_text())
        function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
        for decorator in function.decorator_list:
            call = decorator if isinstance(decorator, ast.Call) else None
            if ast.unparse(call.func if call else decorator) != "step":
                continue
            try:
                declared = {k.arg: ast.literal_eval(k.value) for k in call.keywords} if call else {}
            except ValueError:
                raise ValueError(
                    f"{path}: @step's requires and produces must be literals, as deploy reads them"
                ) from None
            args = function.args.args + function.args.kwonlyargs
            inputs = [a.arg for a in args if a.annotation is not None and ast.unparse(a.annotation) == "Dataset"]
            step = f"{name.replace('_', '-')}/{deployment['name']}"
            found[step] = Contract.of(inputs or [DATA], declared.get("requires"), declared.get("produces"))
    return found
