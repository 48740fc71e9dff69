"""Replay a past pipeline run: its stored input, its steps, and exactly the images it ran.

    python tools/replay.py <main run id> [--watch]     # make replay RUN=<main run id>

It reads the run's output (its output.json in the data store's run layout), then starts a new run of
the same deployment with the same input reference, steps and parameters, the main flow's image as
a per-run job variable and each step's image in `images`, so the main flow passes those to
run_deployment. Nothing is rebuilt or redeployed. Run it in the `cli` service (make replay).
"""

import argparse
import json
import sys
import time
from uuid import UUID

import fsspec
from prefect import get_client

from stepkit import signature
from stepkit.layout import RunLayout


def replay(run_id: UUID, watch: bool) -> None:
    uri = RunLayout.of(run_id).output
    try:
        with fsspec.open(uri) as file:
            output = signature.verified(json.load(file), uri)  # its images and input are what runs next
    except FileNotFoundError:
        sys.exit(f"error: no output at {uri}: run {run_id} did not complete, or retention removed it")
    except signature.Unsigned as exc:
        sys.exit(f"error: {exc}")
    with get_client(sync_client=True) as client:
        old = client.read_flow_run(run_id)
        new = client.create_flow_run_from_deployment(
            old.deployment_id,
            parameters={
                **old.parameters,
                "steps": output["steps"],
                "data": output["input"],
                "images": {name: result["image"] for name, result in output["results"].items()},
            },
            job_variables={"image": output["main_image"]},
            tags=[f"replay-of:{run_id}"],
        )
        print(f"replaying {run_id} as {new.id} ({new.name}) with {output['main_image']}")
        if watch:
            while not (state := client.read_flow_run(new.id).state).is_final():
                time.sleep(1)
            print(f"{new.id}: {state.name} {state.message or ''}")
            sys.exit(0 if state.is_completed() else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id", type=UUID, help="a main-flow run that completed")
    parser.add_argument("--watch", action="store_true", help="wait for the replay to finish")
    args = parser.parse_args()
    replay(args.run_id, args.watch)


if __name__ == "__main__":
    main()
