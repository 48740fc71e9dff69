"""The main flow's plan, published as it goes for the live view of its run (stepkit/status.py):
the steps in order, then each step's partitions, cache and rows as it starts, and the ingest's
own state. At the end, the same table and the graph (Mermaid) for the run's artifact."""

import copy
import threading
import time
from typing import Any

from prefect import get_client
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.variables import Variable

from stepkit import status


class Progress:
    """The plan of one main run, and where it is published."""

    def __init__(self, run_id: Any, needs: dict[str, dict[str, str]]):
        """`needs`: each step's inputs, by the step whose output each reads (stepkit/graph.py)."""
        self.run_id, self.name, self.lock, self.needs = run_id, status.variable(run_id), threading.Lock(), needs
        self.plan: list[status.Planned] = [status.Planned(step="ingest", state="Running")]
        self.plan += [status.Planned(step=name) for name in needs]
        self.publish()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """However the run ends (but killed), its artifact shows the table."""
        if exc_info[0] is not None:
            for planned in self.plan:
                if planned.get("state") == "Running":
                    planned["state"] = "Failed"
        create_markdown_artifact(key="pipeline-status", markdown=self.table(), description="Each step of the run")

    def table(self) -> str:
        """The view of the run as it ends, in markdown: every step, from its step runs, and the graph."""
        rows = self.rows()
        return f"{status.markdown(rows)}\n\n{status.mermaid(rows, self.plan, self.needs)}"

    def update(self, step: str, **facts: Any) -> None:
        with self.lock:  # steps of independent branches update it at once
            next(planned for planned in self.plan if planned["step"] == step).update(facts)

    def publish(self) -> None:
        # One Variable per run, named after it (what a run's credential may write), removed by retention.
        with self.lock:
            plan = copy.deepcopy(self.plan)
        Variable.set(self.name, plan, tags=[status.TAG], overwrite=True, _sync=True)

    def rows(self) -> list[status.Row]:
        """A row per step, from its step runs as the server has them now."""
        parent = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[self.run_id]))
        names: dict[Any, str] = {}
        runs = []
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(flow_run_filter=parent):
                if run.deployment_id not in names:
                    deployment = client.read_deployment(run.deployment_id)
                    names[run.deployment_id] = f"{client.read_flow(deployment.flow_id).name}/{deployment.name}"
                runs.append(status.step_run(run, names[run.deployment_id]))
        return status.rows(self.plan, runs, time.time())
