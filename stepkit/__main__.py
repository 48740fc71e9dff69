"""`python -m stepkit output <main run id>`: print a run's pipeline output from the data store."""

import argparse
import json
import sys

import fsspec

from stepkit import signature
from stepkit.layout import RunLayout


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stepkit", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["output"])
    parser.add_argument("run_id", help="a main-flow run id")
    uri = RunLayout.of(parser.parse_args().run_id).output
    try:
        with fsspec.open(uri, "rb") as file:
            text = file.read().decode()
        signature.verified(json.loads(text), uri)
    except FileNotFoundError:
        sys.exit(f"error: no output at {uri}: the run did not complete, or retention removed it")
    except signature.Unsigned as exc:
        sys.exit(f"error: {exc}")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
