"""`python -m stepkit output <main run id>`: print a run's pipeline output from the data store."""

import argparse
import sys

import fsspec

from stepkit.layout import RunLayout


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stepkit", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["output"])
    parser.add_argument("run_id", help="a main-flow run id")
    uri = RunLayout.of(parser.parse_args().run_id).output
    try:
        with fsspec.open(uri, "rb") as file:
            sys.stdout.write(file.read().decode())
    except FileNotFoundError:
        sys.exit(f"error: no output at {uri}: the run did not complete, or retention removed it")


if __name__ == "__main__":
    main()
