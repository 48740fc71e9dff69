"""The step cache on the real stack: an unchanged run starts no step, a deleted output or
`refresh` recomputes, a changed source recomputes everything, two identical runs at once both
end correct, and a resume of a mapped step recomputes only its failed partition. (Resume after a
fix and redeploy: tests/test_redeploy.py.)"""

import re

import pyarrow as pa
import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from tests.harness import SETTINGS, expected_summary, iris_like, write_csv

pytestmark = pytest.mark.e2e

STEPS = ("validate/validate", "subflow/subflow")
KEY = "pipeline-output"  # the main flow's artifact
MAPPED = [{"step": "validate/validate", "partitions": 4}, "subflow/subflow"]


@pytest.fixture(scope="module")
def source(serve, tmp_path_factory):
    """A source no other test uses, so no entry exists for it yet: its URL and expected summary."""
    table = iris_like(2_000, seed=17)
    return serve("cached.csv", write_csv(table, tmp_path_factory.mktemp("csv") / "a.csv").read_bytes()), table


@pytest.fixture(scope="module")
def first(stack, source):
    """The first run on the source: it computes every step and records them."""
    run = stack.run("main-flow/main", source=source[0], refresh=[])
    assert run.state.is_completed(), run.state
    return run, stack.output(run)


def computed(stack, run) -> set[str]:
    """The steps a main run started: its child runs' deployments."""
    return {f"{stack.flow_name(child)}/{stack.flow_name(child)}" for child in stack.children(run.id)}


def assert_correct(output: dict, table) -> None:
    summary, expected = output["results"]["subflow/subflow"]["summary"], expected_summary(table)
    assert [(g["species"], g["count"]) for g in summary] == [(g["species"], g["count"]) for g in expected]


def test_an_unchanged_run_starts_no_step_and_gives_the_same_output(stack, source, first):
    run, output = first
    assert computed(stack, run) == set(STEPS) and output["cached"] == {}
    again = stack.run("main-flow/main", source=source[0], refresh=[])
    assert again.state.is_completed(), again.state
    reused = stack.output(again)
    assert computed(stack, again) == set()  # no child run: no container was started for a step
    assert reused["cached"] == {name: str(run.id) for name in ("ingest", *STEPS)}
    assert reused["input"] == output["input"]
    for name in STEPS:
        assert reused["results"][name]["output"] == output["results"][name]["output"]  # same uri and sha256
        assert reused["results"][name]["cached_from"] == str(run.id)
    assert_correct(reused, source[1])
    with stack.api() as client:  # the UI shows it on the run's artifact
        of_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[again.id]), key=ArtifactFilterKey(any_=[KEY]))
        (artifact,) = client.read_artifacts(artifact_filter=of_run)
    assert f"subflow/subflow: cached from run {run.id}" in artifact.data


def test_a_deleted_output_is_recomputed_and_refresh_forces_a_step(stack, source, first):
    run, output = first
    summary = output["results"]["subflow/subflow"]["output"]["uri"].removeprefix("file://")
    stack.on_volume("data", "rm", summary, write_as=SETTINGS["FLOW_UID"])
    forced = stack.run("main-flow/main", source=source[0], refresh=["validate/validate"])
    assert forced.state.is_completed(), forced.state
    assert computed(stack, forced) == set(STEPS)
    assert stack.output(forced)["cached"] == {"ingest": str(run.id)}
    assert_correct(stack.output(forced), source[1])


def test_a_changed_source_recomputes_and_two_identical_runs_at_once_end_correct(stack, serve, source, first, tmp_path):
    table = iris_like(3_000, seed=18)  # new bytes at the same URL
    assert serve("cached.csv", write_csv(table, tmp_path / "b.csv").read_bytes()) == source[0]
    runs = [stack.start("main-flow/main", source=source[0], refresh=[]) for _ in range(2)]  # at once
    done = [stack.wait_final(run.id) for run in runs]
    assert all(run.state.is_completed() for run in done), [run.state for run in done]
    for run, other in zip(runs, reversed(runs), strict=True):
        output = stack.output(run)
        assert set(output["cached"].values()) <= {str(other.id)}  # nothing from before the change
        assert output["input"]["rows"] == 3_000
        assert_correct(output, table)


def test_a_failed_partition_is_named_and_a_resume_recomputes_only_it(stack, serve, tmp_path):
    """validate mapped over 4 partitions of 100 rows, 2 at once; a bad row in the last one fails
    it, naming the partition and its run. The others finished and were recorded: a resume starts
    only it."""
    table = iris_like(400, seed=19)
    lengths = table["sepal_length"].to_pylist()
    bad = table.set_column(0, "sepal_length", pa.array([*lengths[:350], -1.0, *lengths[351:]]))
    source = serve("mapped-bad.csv", write_csv(bad, tmp_path / "bad.csv").read_bytes())
    failed = stack.run("main-flow/main", source=source, steps=MAPPED, part_rows=100, partitions_at_once=2)
    message = r"step validate/validate partition 4 of 4 \(run '[\w-]+'\) ended.*'-1\.0' at row 50"  # of the partition
    assert failed.state.is_failed() and re.search(message, failed.state.message), failed.state
    partitions = stack.children(failed.id)
    assert len(partitions) == 4  # and no subflow
    # By creation, which the main flow controls: a short partition may end before another's container starts.
    at_once = [sum(r.created <= run.created < r.end_time for r in partitions) for run in partitions]
    assert max(at_once) == 2, at_once  # partitions_at_once
    again = stack.run("main-flow/main", resume_from=str(failed.id), refresh=[])
    assert again.state.is_failed() and re.search(message, again.state.message), again.state
    (rerun,) = stack.children(again.id)
    assert rerun.parameters["data"]["uri"].endswith(f"/runs/{failed.id}/input/part-00003.parquet")
