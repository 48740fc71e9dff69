"""`make run`: warn when prefect.yaml's steps of the pipeline are not the ones the server has (a
deploy registers them: tools/deploy/steps.py), upload a file of yours to the inbox, run the
pipeline and show it live until it ends.

    python tools/pipeline.py run [--pipeline NAME] [SOURCE]
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import NoReturn
from uuid import UUID

import yaml
from inbox import upload  # tools/ is on the path: this is run as a script
from prefect.variables import Variable
from status import follow

from stepkit import Steps, steps_variable

ROOT = Path(__file__).resolve().parent.parent


def declared() -> dict[str, Steps]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["pipelines"]


def check(pipeline: str) -> None:
    """Refuse a pipeline prefect.yaml does not declare; warn, without failing, when its steps are
    not the ones the server has."""
    if pipeline not in declared():
        sys.exit(f"error: prefect.yaml declares no pipeline {pipeline!r}: its pipelines are {sorted(declared())}")
    registered = Variable.get(steps_variable(pipeline), _sync=True)
    if registered != declared()[pipeline]:
        print(
            f"warning: prefect.yaml's steps {declared()[pipeline]} are not the registered pipeline {pipeline} "
            f"{registered}: register them with `docker compose run --rm cli prefect deploy --name {pipeline}`",
            file=sys.stderr,
        )


def run(pipeline: str, source: str | None) -> NoReturn:
    """`make run`: warn if the steps differ, upload `source` if it is a file, run the pipeline and
    show it live until it ends (tools/status.py)."""
    check(pipeline)
    command = ["prefect", "deployment", "run", f"main-flow/{pipeline}"]
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
    parser = argparse.ArgumentParser(prog="python tools/pipeline.py", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--pipeline", default="main", help="a pipeline of prefect.yaml (default: main)")
    parser.add_argument("source", nargs="?", help="a file, an s3:// or an https:// source (default: the shipped Iris)")
    args = parser.parse_intermixed_args()  # `run --pipeline main SOURCE`: a positional after the option
    run(args.pipeline, args.source)
