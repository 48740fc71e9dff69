"""`make run`: warn when prefect.yaml's steps are not the ones the server has (a deploy
registers them: tools/deploy/steps.py), upload a file of yours to the inbox, run the pipeline and
show it live until it ends.

    python tools/pipeline.py run [SOURCE]
"""

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

from stepkit import PIPELINE_STEPS, Steps

ROOT = Path(__file__).resolve().parent.parent


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
