"""Unit tests of the step cache: its key, its entries in a real file store, and which runs may
reuse them."""

import json

import pyarrow as pa
import pytest
from pydantic import TypeAdapter, ValidationError

from main_flow import cache
from stepkit import Steps, signature, write_parquet
from stepkit.graph import GraphError, graph_of, uncached

IMAGE = "127.0.0.1:5000/subflow@sha256:" + "a" * 64
KEY = {"step": "subflow/subflow", "image": IMAGE, "parameters": {"a": 1, "b": [1, 2]}, "inputs": ["f" * 64]}


def test_the_key_changes_with_each_of_its_parts_and_only_with_them(monkeypatch):
    base = cache.key(**KEY)
    assert cache.key(**{**KEY, "parameters": {"b": [1, 2], "a": 1}}) == base  # canonical: key order is no change
    changed = [
        {"step": "validate/validate"},
        {"image": IMAGE.replace("a" * 64, "b" * 64)},
        {"parameters": {"a": 2, "b": [1, 2]}},
        {"inputs": ["e" * 64]},
        {"pipeline": "enriched"},  # a pipeline reads only its own runs' data
    ]
    keys = {cache.key(**{**KEY, **change}) for change in changed}
    monkeypatch.setattr(cache, "WIRE", cache.WIRE + 1)
    keys.add(cache.key(**KEY))
    assert base not in keys and len(keys) == len(changed) + 1


def test_an_image_without_a_digest_is_never_cached():
    assert cache.key(**{**KEY, "image": "127.0.0.1:5000/subflow:v1"}) is None
    assert cache.Policy("r2").lookup("subflow/subflow", None) is None


@pytest.fixture
def entry(run_dir, monkeypatch) -> tuple[str, dict]:
    """An entry of run r1 whose output is stored in its run directory, signed with the main flow's key."""
    monkeypatch.setenv(signature.KEY_ENV, "k" * 64)
    ref = write_parquet(pa.table({"x": [1, 2, 3]}), f"file://{run_dir}/subflow/summary.parquet")
    key = cache.key(**KEY)
    cache.record(key, "subflow/subflow", "r1", {"output": ref, "report": "three rows"})
    return key, ref


def test_a_recorded_result_is_found_with_its_run(entry):
    key, ref = entry
    found = cache.lookup(key)
    result = {"output": ref, "report": "three rows"}
    assert {k: v for k, v in found.items() if k != "signature"} == {
        "key": key, "step": "subflow/subflow", "run": "r1", "result": result
    }  # fmt: skip
    assert cache.lookup(cache.key(**{**KEY, "inputs": ["0" * 64]})) is None


def test_a_missing_or_changed_output_is_a_miss_not_an_error(entry, run_dir):
    key, ref = entry
    output = run_dir / "subflow" / "summary.parquet"
    output.write_bytes(output.read_bytes()[:-1] + b"!")
    assert cache.lookup(key) is None
    output.unlink()
    assert cache.lookup(key) is None


def test_an_entry_pointing_outside_the_runs_or_unreadable_is_a_miss(entry, run_dir, tmp_path):
    key, ref = entry
    path = tmp_path / "cache" / f"{key}.json"
    outside = write_parquet(pa.table({"x": [1]}), f"file://{tmp_path}/elsewhere.parquet")
    # Signed as a main flow would sign it: refused for where it points, not for its signature.
    path.write_text(json.dumps(signature.signed({**json.loads(path.read_text()), "result": {"output": outside}})))
    assert cache.lookup(key) is None
    path.write_text("{not json")
    assert cache.lookup(key) is None


def test_an_entry_a_step_forged_or_rewrote_is_a_miss_and_said(entry, tmp_path, caplog):
    """A step holds no signing key: what it writes into the cache is not trusted."""
    key, ref = entry
    path = tmp_path / "cache" / f"{key}.json"
    good = json.loads(path.read_text())
    forged = {**good, "result": {**good["result"], "report": "lies"}}  # the signature of the original
    for written in (forged, {k: v for k, v in forged.items() if k != "signature"}, signature.signed(forged, b"x" * 64)):
        path.write_text(json.dumps(written))
        assert cache.lookup(key) is None
    assert (
        f"cache entry {key[:12]} not used: cache entry {key[:12]} is not signed by this stack's main flow"
        in caplog.text
    )
    path.write_text(json.dumps(good))
    assert cache.lookup(key)["result"]["report"] == "three rows"


def test_a_record_leaves_one_whole_entry_and_the_last_wins(entry, tmp_path):
    key, ref = entry
    cache.record(key, "subflow/subflow", "r2", {"output": ref})
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{key}.json"]
    assert cache.lookup(key)["run"] == "r2"


def test_refresh_opt_out_and_resume_decide_who_reuses(entry):
    key, _ = entry
    assert cache.Policy("r2").lookup("subflow/subflow", key)["run"] == "r1"
    assert cache.Policy("r2", refresh=["subflow/subflow"]).lookup("subflow/subflow", key) is None
    assert cache.Policy("r2", refresh="all").lookup("subflow/subflow", key) is None
    assert cache.Policy("r2", refresh=["validate/validate"]).lookup("subflow/subflow", key) is not None
    off = frozenset({"subflow/subflow"})
    assert cache.Policy("r2", off=off).lookup("subflow/subflow", key) is None
    assert cache.Policy("r2", off=off, resume_from="r1").lookup("subflow/subflow", key)["run"] == "r1"


def test_steps_take_options_and_refuse_unknown_ones():
    steps = ["a/a", {"step": "b/b", "cache": False}, [{"step": "c/c", "partitions": 4}, "d/d"]]
    assert TypeAdapter(Steps).validate_python(steps) == steps
    assert uncached(graph_of(steps)) == {"b/b"}
    assert graph_of(steps)["c/c"].options == {"step": "c/c", "partitions": 4}
    with pytest.raises(ValidationError, match="cahce"):
        TypeAdapter(Steps).validate_python([{"step": "b/b", "cahce": False}])
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        TypeAdapter(Steps).validate_python([{"step": "b/b", "partitions": 0}])
    with pytest.raises(GraphError, match=r"steps \['b/b'\]: give partitions or rows_per_partition, not both"):
        graph_of([{"step": "b/b", "partitions": 2, "rows_per_partition": 10}])


def test_refresh_names_only_steps_of_the_run():
    steps = {"validate/validate", "subflow/subflow"}
    assert cache.checked(["ingest", "subflow/subflow"], steps) == ["ingest", "subflow/subflow"]
    assert cache.checked("all", steps) == "all"
    with pytest.raises(ValueError, match=r"refresh names \['subflow/subflw'\], which are not steps of this run"):
        cache.checked(["subflow/subflw"], steps)


def test_an_output_two_entries_share_is_read_once_per_run(entry, monkeypatch):
    key, ref = entry  # e.g. the input that ingest stored and validate passed on
    other = cache.key(**{**KEY, "step": "validate/validate"})
    cache.record(other, "validate/validate", "r1", {"output": ref})
    reads = []
    monkeypatch.setattr(cache, "verify", lambda r: reads.append(r["uri"]))
    policy = cache.Policy("r2")
    assert policy.lookup("subflow/subflow", key) and policy.lookup("validate/validate", other)
    assert reads == [ref["uri"]]
    assert cache.Policy("r3").lookup("subflow/subflow", key) and len(reads) == 2  # another run reads it again
