"""A `prefect deploy` step: the pipeline's steps, declared once in prefect.yaml
(`definitions.steps`), saved as the Variable each main-flow run reads when it is given no `steps`.

    push:
      - tools/deploy/steps.py:register_steps: {steps: *steps}    # prefect.yaml: on every deploy

So `prefect deploy --name enrich` after `make component NAME=enrich` is enough for the next run
to include enrich, and an edit of `steps` alone reaches the next run with `prefect deploy --name
main` (main's image is unchanged, so nothing is built).
"""

from typing import TypedDict

from prefect.variables import Variable
from pydantic import TypeAdapter, ValidationError

from stepkit import PIPELINE_STEPS, Steps


class Registered(TypedDict):
    steps: Steps


def register_steps(steps: list) -> Registered:
    """Save the pipeline's steps as the Variable the main flow reads, once they parse as a pipeline."""
    try:
        checked = TypeAdapter(Steps).validate_python(steps)
    except ValidationError as exc:
        raise ValueError(f"prefect.yaml's steps {steps} are not a pipeline: each is `flow/deployment` ({exc})") from exc
    Variable.set(PIPELINE_STEPS, checked, overwrite=True, _sync=True)
    return Registered(steps=checked)
