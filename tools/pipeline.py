"""The pipeline's steps: declared once in prefect.yaml (`definitions.steps`), registered with the
server by every `prefect deploy`, read by each main-flow run that passes no `steps` of its own.

    push:
      - tools/pipeline.py:register_steps: {steps: *steps}    # prefect.yaml: runs on every deploy
    python tools/pipeline.py run [SOURCE]                    # make run: warn if they differ, then run

So `prefect deploy --name enrich` after `make component NAME=enrich` is enough for the next run
to include enrich, and an edit of `steps` alone reaches the next run with `prefect deploy --name
main` (main's image is unchanged, so nothing is built).
"""

import re
import subprocess
import sys
from pathlib import Path
from typing import NoReturn, TypedDict
from uuid import UUID

import yaml
from prefect.variables import Variable
from pydantic import TypeAdapter, ValidationError

from stepkit import PIPELINE_STEPS, Steps

ROOT = Path(__file__).resolve().parent.parent


class Registered(TypedDict):
    steps: Steps


def register_steps(steps: list) -> Registered:
    """A `prefect deploy` push step: save the pipeline's steps as the Variable the main flow reads."""
    try:
        checked = TypeAdapter(Steps).validate_python(steps)
    except ValidationError as exc:
        raise ValueError(f"prefect.yaml's steps {steps} are not a pipeline: each is `flow/deployment` ({exc})") from exc
    Variable.set(PIPELINE_STEPS, checked, overwrite=True, _sync=True)
    return Registered(steps=checked)


def declared() -> Steps:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["steps"]


def check() -> None:
    """Warn, without failing, when prefect.yaml's steps are not the ones the server has."""
    registered = Variable.get(PIPELINE_STEPS, _sync=True)
    if registered != declared():
        print(
            f"warning: prefect.yaml's steps {declared()} are not the registered pipeline {registered}: "
            "register them with `docker compose run --rm cli prefect deploy --name main`",
            file=sys.stderr,
        )


def run(source: str | None) -> NoReturn:
    """`make run`: warn if the steps differ, upload `source` if it is a file, run the pipeline and
    show it live until it ends (tools/status.py)."""
    from inbox import upload  # tools/, on the path when run as a script (not in prefect deploy's import)
    from status import follow

    check()
    command = ["prefect", "deployment", "run", "main-flow/main"]
    if source:
        if source.startswith(("/", "./", "../", "~")):  # a path (make mounts yours at /upload/)
            try:
                source, new = upload(Path(source))
            except FileNotFoundError as exc:
                sys.exit(f"error: {exc}")
            print(f"{'uploaded to' if new else 'already in'} the inbox: {source}", flush=True)
        command += ["--param", f"source={source}"]
    created = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(created.stdout)
    if created.returncode != 0:
        sys.exit(created.stderr)
    sys.stdout.flush()
    sys.exit(follow(UUID(re.search(r"UUID: ([0-9a-f-]{36})", created.stdout)[1])))


if __name__ == "__main__":
    if sys.argv[1:2] != ["run"] or len(sys.argv) > 3:
        sys.exit("usage: python tools/pipeline.py run [SOURCE]")
    run(sys.argv[2] if len(sys.argv) == 3 else None)
