"""The live view of a run (stepkit/status.py, tools/status.py) against a real Prefect API, no
Docker: a step's state from its partitions' latest attempts, what is cached, plain lines off a
terminal, and the exit status of the run it followed."""

import io
import sys
import uuid

import pytest
from prefect import get_client, task
from prefect.states import Completed, Crashed, Failed, Running, Scheduled

from stepkit import status
from tests.harness import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import status as tool  # noqa: E402  (tools/status.py)

RUNS = "file:///store/runs"


@task
def placeholder() -> None:
    """What run_deployment's parent task runs are made of."""


def test_a_steps_state_is_its_partitions_latest_attempts():
    plan = [
        status.Planned(step="ingest", state="Completed", rows=400, seconds=1.5, partitions=1),
        status.Planned(step="validate/validate", partitions=2, rows=400),
        status.Planned(step="subflow/subflow", partitions=1, cached=True, rows=400),
        status.Planned(step="enrich/enrich"),
    ]
    runs = [
        {"step": "validate/validate", "partition": 0, "attempt": 1, "state": "Completed", "start": 10.0, "end": 12.0},
        {"step": "validate/validate", "partition": 1, "attempt": 1, "state": "Crashed", "start": 10.0, "end": 11.0},
        {"step": "validate/validate", "partition": 1, "attempt": 2, "state": "Running", "start": 11.5, "end": None},
    ]
    rows = {row["step"]: row for row in status.rows(plan, runs, now=14.0)}
    assert rows["ingest"] == status.Row(step="ingest", state="Completed", attempt=0, done=1, partitions=1, rows=400,
                                        seconds=1.5, cached=False)  # fmt: skip
    assert (rows["validate/validate"]["state"], rows["validate/validate"]["attempt"]) == ("Running", 2)
    assert (rows["validate/validate"]["done"], rows["validate/validate"]["seconds"]) == (1, 4.0)
    assert (rows["subflow/subflow"]["state"], rows["subflow/subflow"]["done"]) == ("Cached", 1)
    assert rows["enrich/enrich"]["state"] == "Waiting" and rows["enrich/enrich"]["seconds"] is None
    lines = status.text(list(rows.values()))
    assert lines[0].split() == list(status.COLUMNS)
    assert lines[2].split() == ["validate/validate", "Running", "2", "1/2", "400", "4.0", "no"]
    assert (
        status.markdown(list(rows.values())).splitlines()[4] == "| subflow/subflow | Cached | - | 1/1 | 400 | - | yes |"
    )
    plan[2]["image"] = "reg/subflow@sha256:" + "ab" * 32
    needs = {"validate/validate": {"data": "ingest"}, "subflow/subflow": {"data": "validate/validate"},
             "enrich/enrich": {"left": "validate/validate", "right": "subflow/subflow"}}  # fmt: skip
    chart = status.mermaid(list(rows.values()), plan, needs).splitlines()
    assert chart[:2] == ["```mermaid", "graph LR"] and chart[-1] == "```"
    assert chart[4] == '  s2["subflow/subflow<br/>Cached<br/>400 rows<br/>sha256:abababababab"]'
    assert chart[6:10] == ["  s0 --> s1", "  s1 --> s2", "  s1 -->|left| s3", "  s2 -->|right| s3"]


@pytest.fixture(scope="module")
def main_run(prefect_api):
    """A main run with its plan published, a step with two partitions (one retried), and a step not started."""
    with get_client(sync_client=True) as client:
        main_deployment = client.create_deployment(client.create_flow_from_name("main-flow"), "status")
        step = client.create_deployment(client.create_flow_from_name("validate"), "validate")
        main = client.create_flow_run_from_deployment(main_deployment, state=Running())
        plan = [
            status.Planned(step="ingest", state="Completed", rows=150, seconds=0.5, partitions=1, cached=False),
            status.Planned(step="validate/validate", partitions=2, rows=150, cached=False),
            status.Planned(step="subflow/subflow"),
        ]
        from prefect.variables import Variable

        Variable.set(status.variable(main.id), plan, tags=[status.TAG], _sync=True)
        for partition, attempt, state in ((0, 1, Completed()), (1, 1, Crashed()), (1, 2, Running())):
            parent = client.create_task_run(placeholder, flow_run_id=main.id, dynamic_key=str(uuid.uuid4()))
            out = f"{RUNS}/{main.id}/validate/part-{partition:05d}"
            child = client.create_flow_run_from_deployment(
                step, parameters={"out": out}, parent_task_run_id=parent.id,
                tags=[f"attempt-{attempt}"] if attempt > 1 else [], state=Scheduled(),
            )  # fmt: skip
            client.set_flow_run_state(child.id, state, force=True)
    return main


def test_the_view_reads_the_plan_and_the_step_runs(main_run):
    with get_client(sync_client=True) as client:
        main, rows = tool.view(client, main_run.id, {})
    assert main.id == main_run.id
    assert [(r["step"], r["state"], r["attempt"], r["done"], r["partitions"]) for r in rows] == [
        ("ingest", "Completed", 0, 1, 1),
        ("validate/validate", "Running", 2, 1, 2),
        ("subflow/subflow", "Waiting", 0, 0, 1),
    ]


def test_off_a_terminal_it_prints_plain_lines_until_the_run_ends_and_exits_with_its_outcome(main_run):
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(main_run.id, Failed(message="step validate/validate ended Crashed"), force=True)
    out = io.StringIO()  # not a terminal
    assert tool.follow(main_run.id, out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(f"({main_run.id}): Failed") and "\x1b[" not in out.getvalue()
    assert lines[1].split() == list(status.COLUMNS) and lines[3].split()[:4] == [
        "validate/validate",
        "Running",
        "2",
        "1/2",
    ]
    assert lines[-1] == "step validate/validate ended Crashed"
