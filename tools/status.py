"""The live view of a pipeline run: each step with its state, attempt, partitions done out of
total, rows, seconds, and whether the cache gave it (stepkit/status.py).

    python tools/status.py <main run id>     # make status RUN=<main run id>: until the run ends

In a terminal it redraws in place, like a progress display; elsewhere (a log, CI) it prints a line
whenever a step changes. It ends with the run, exiting 0 if the run completed, 1 otherwise.
"""

import argparse
import sys
import time
from typing import Any, TextIO
from uuid import UUID

from prefect import get_client
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.exceptions import ObjectNotFound

from stepkit import status

EVERY_S = 1.0


def view(client: SyncPrefectClient, run_id: UUID, names: dict[Any, str]) -> tuple[Any, list[status.Row]]:
    """The main run, and the rows of its steps now; `names`: deployment ids' `flow/deployment`."""
    main = client.read_flow_run(run_id)
    try:
        plan = client.read_variable_by_name(status.variable(run_id)).value
    except (AttributeError, ObjectNotFound):
        plan = None
    parent = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
    runs = []
    for child in client.read_flow_runs(flow_run_filter=parent):
        if child.deployment_id not in names:
            deployment = client.read_deployment(child.deployment_id)
            names[child.deployment_id] = f"{client.read_flow(deployment.flow_id).name}/{deployment.name}"
        runs.append(status.step_run(child, names[child.deployment_id]))
    if plan is None:  # a run from before the view, or not started yet: its step runs alone
        plan = [status.Planned(step=name) for name in dict.fromkeys(run["step"] for run in runs)]
    return main, status.rows(plan, runs, time.time())


def follow(run_id: UUID, out: TextIO = sys.stdout) -> int:
    """Show the run until it ends; 0 if it completed."""
    names: dict[Any, str] = {}
    shown, drawn = None, 0
    with get_client(sync_client=True) as client:
        while True:
            main, rows = view(client, run_id, names)
            state = main.state.name if main.state else "Scheduled"
            lines = [f"{main.name} ({run_id}): {state}", *status.text(rows)]
            if out.isatty():
                out.write(f"\x1b[{drawn}F\x1b[J" if drawn else "")  # up to the first line drawn, and clear
                out.write("\n".join(lines) + "\n")
                drawn = len(lines)
            elif lines != shown:
                out.write("\n".join(lines) + "\n")
            out.flush()
            shown = lines
            if main.state is not None and main.state.is_final():
                if main.state.message:
                    out.write(f"{main.state.message}\n")
                return 0 if main.state.is_completed() else 1
            time.sleep(EVERY_S)  # a display refresh, not a wait for a condition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id", type=UUID, help="a main-flow run")
    sys.exit(follow(parser.parse_args().run_id))


if __name__ == "__main__":
    main()
