"""Unit tests of the step kit on real files and real Prefect runs, without Docker."""

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.states import Completed

import stepkit
from conftest import CountingFileSystem
from main_flow import steps
from stepkit import (
    WIRE,
    Contract,
    DataRef,
    Dataset,
    Out,
    Output,
    RunLayout,
    WireMismatch,
    atomic_write,
    check_wire,
    dataset_of,
    parts_of,
    step,
    verify,
    write_parquet,
)
from stepkit.layout import RefusedReference, redact, run_id_of
from stepkit.store import VerifyingReader, open_verified


@pytest.fixture
def counted(tmp_path, monkeypatch):
    """A 200,000-row table in 8 row groups, the input of main run r1 in a counted:// store, as a
    step would get it."""
    monkeypatch.setenv("PIPELINE_DATA_URL", f"counted://{tmp_path}")
    table = pa.table({"g": [i % 7 for i in range(200_000)], "v": [float(i) for i in range(200_000)]})
    ref = write_parquet(table, f"file://{tmp_path}/runs/r1/input.parquet", row_group_size=25_000)
    CountingFileSystem.opens = CountingFileSystem.bytes_read = 0
    return {**ref, "uri": f"counted://{tmp_path}/runs/r1/input.parquet"}


def test_atomic_write_hashes_and_leaves_nothing_partial(tmp_path):
    with atomic_write(f"file://{tmp_path}/a/b.bin") as sink:
        sink.write(b"hello")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"hello"
    assert sink.sha256.hexdigest() == hashlib.sha256(b"hello").hexdigest() and sink.bytes == 5
    with pytest.raises(RuntimeError), atomic_write(f"file://{tmp_path}/a/c.bin") as sink:
        sink.write(b"half")
        raise RuntimeError("the writer failed")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]


def test_verify_names_a_missing_or_corrupt_object(tmp_path):
    ref = write_parquet(pa.table({"a": [1, 2, 3]}), f"file://{tmp_path}/input.parquet")
    verify(ref)
    path = tmp_path / "input.parquet"
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="stored object corrupt: .*input.parquet does not match its sha256"):
        verify(ref)
    path.write_bytes(path.read_bytes() + b"more")
    with pytest.raises(ValueError, match="stored object corrupt"):
        verify(ref)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="stored object missing: .*input.parquet"):
        verify(ref)


def test_the_verifying_reader_serves_any_read_pattern_and_hashes_each_byte_once(tmp_path):
    data = bytes(range(256)) * 40_000  # 10 MB: several chunks
    (tmp_path / "x").write_bytes(data)
    ref = DataRef(wire=WIRE, uri="", rows=0, columns=[], bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    with open(tmp_path / "x", "rb") as file:
        reader = VerifyingReader(file, ref)
        reader.seek(-65536, io.SEEK_END)
        assert reader.read() == data[-65536:]  # a footer first, as Parquet reads
        reader.seek(4)
        assert reader.read(3_000_000) == data[4:3_000_004]  # a small gap before it
        reader.seek(5_000_000)
        assert reader.read(100) == data[5_000_000:5_000_100]  # a larger one
        reader.seek(10)
        assert reader.read(5) == data[10:15]  # back again
        reader.finish()
    assert reader.fetched <= len(data) + 5


def test_each_step_of_the_kit_reads_its_input_once(prefect_api, counted, tmp_path):
    @step
    def summing(data: Dataset) -> Output:
        total = sum(pa.compute.sum(batch["v"]).as_py() for batch in data.batches(max_bytes=100_000))
        return Output(data.ref, [{"total": total}], "summed")

    result = summing(data=counted, out=RunLayout.of("r1").step("summing"))
    assert result["summary"] == [{"total": float(sum(range(200_000)))}]
    assert CountingFileSystem.opens == 1
    assert counted["bytes"] <= CountingFileSystem.bytes_read <= counted["bytes"] + 1024


def test_a_dataset_of_parts_reads_as_one_and_each_part_is_verified(prefect_api, counted, tmp_path):
    table = pq.read_table(tmp_path / "runs" / "r1" / "input.parquet")
    parts = [
        {**write_parquet(table.slice(i, 50_000), f"file://{tmp_path}/runs/r1/p/{i}.parquet"),
         "uri": f"counted://{tmp_path}/runs/r1/p/{i}.parquet"}
        for i in range(0, 200_000, 50_000)
    ]  # fmt: skip
    data = dataset_of(parts)
    assert (data["uri"], data["rows"], len(parts_of(data))) == (f"counted://{tmp_path}/runs/r1/p", 200_000, 4)
    assert parts_of(data) == parts and dataset_of([parts[0]]) == parts[0]
    elsewhere = [{**p, "uri": p["uri"].replace("/p/", "/q/")} for p in parts]
    assert dataset_of(elsewhere)["sha256"] == data["sha256"]  # it names the content, not where it is

    @step
    def summing(data: Dataset) -> Output:
        total = sum(pa.compute.sum(batch["v"]).as_py() for batch in data.batches(max_bytes=100_000))
        return Output(data.ref, [{"total": total}], "summed")

    CountingFileSystem.opens = CountingFileSystem.bytes_read = 0
    result = summing(data=data, out=RunLayout.of("r1").step("summing"))
    assert result["summary"] == [{"total": float(sum(range(200_000)))}] and result["output"] == data
    assert CountingFileSystem.opens == 4 and CountingFileSystem.bytes_read <= data["bytes"] + 4 * 1024
    corrupt = {**data, "parts": [*data["parts"][:2], {**data["parts"][2], "sha256": "0" * 64}, data["parts"][3]]}
    state = summing(data=corrupt, out=RunLayout.of("r1").step("summing"), return_state=True)
    with pytest.raises(ValueError, match=f"stored object corrupt: {parts[2]['uri']} does not match its sha256"):
        state.result()
    with pytest.raises(ValueError, match="parts of a dataset differ in columns"):
        dataset_of([parts[0], {**parts[1], "columns": ["g"]}])


def test_batches_are_sized_by_their_bytes_in_memory_even_when_parquet_encodes_them_small(tmp_path):
    """Few distinct values: dictionary-encoded, 2M rows take under 4 MB in Parquet, 30 MB in memory."""
    rows = 2_000_000
    table = pa.table({"v": [float(i % 10) for i in range(rows)], "s": [("ab", "cdef")[i % 2] for i in range(rows)]})
    pq.write_table(table, tmp_path / "t.parquet")
    parquet = pq.ParquetFile(tmp_path / "t.parquet")
    assert parquet.metadata.row_group(0).total_byte_size < 4 << 20 < table.nbytes // 4
    sizes = [batch.nbytes for batch in stepkit.batches(parquet, max_bytes=4 << 20)]
    assert len(sizes) >= 5 and max(sizes) <= 6 << 20, sizes


def test_a_corrupt_input_fails_the_step_by_name_and_it_writes_nothing(prefect_api, counted, tmp_path):
    @step
    def copying(data: Dataset, out: stepkit.Out) -> Output:
        table = pa.Table.from_batches(list(data.batches()))
        return Output(out.write_table(table, "copy.parquet"), [], "copied")

    state = copying(data={**counted, "sha256": "0" * 64}, out=RunLayout.of("r1").step("copying"), return_state=True)
    with pytest.raises(ValueError, match="stored object corrupt: counted://.*input.parquet does not match its sha256"):
        state.result()
    assert not (tmp_path / "runs" / "r1" / "copying").exists()


def test_a_step_reads_and_writes_only_in_its_runs_part_of_the_store(prefect_api, counted, tmp_path):
    """Outside runs/, another protocol, a path that climbs out, a missing object, another run's
    directory: each is refused with the one message, and nothing is read or written."""
    (tmp_path / "secret.parquet").write_bytes((tmp_path / "runs" / "r1" / "input.parquet").read_bytes())
    (tmp_path / "runs" / "r2").mkdir()

    @step
    def copying(data: Dataset, out: stepkit.Out) -> Output:
        return Output(out.write_table(pa.Table.from_batches(list(data.batches())), "copy.parquet"), [], "")

    inputs = [
        f"counted://{tmp_path}/secret.parquet", "http://prefect-server:4200/api/admin/version", "file:///etc/passwd",
        f"counted://{tmp_path}/runs/r1/../../secret.parquet", f"counted://{tmp_path}/runs/r1/missing.parquet",
        f"counted://{tmp_path}/runs/r1/input.parquet::http://example.com/x",
    ]  # fmt: skip
    outs = [RunLayout.of("r2").step("x"), f"counted://{tmp_path}/runs/r1/../r2/x", f"file://{tmp_path}/runs/r1/x"]
    calls = [({**counted, "uri": uri}, RunLayout.of("r1").step("x")) for uri in inputs] + [(counted, o) for o in outs]
    for data, out in calls:
        state = copying(data=data, out=out, return_state=True)
        with pytest.raises(
            RefusedReference, match="^reference refused: .* is not in this run's part of the data store$"
        ):
            state.result()
    assert CountingFileSystem.opens == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r1", "r2"] and not any(
        (tmp_path / "runs" / "r2").iterdir()
    )


def test_redact_keeps_no_credentials_or_query():
    assert redact("https://user:pw@host.example/a/b.csv?X-Amz-Signature=abc#f") == "https://host.example/a/b.csv"
    assert redact("s3://bucket/key.csv") == "s3://bucket/key.csv" and redact("iris.csv?x") == "iris.csv"


def test_a_reference_of_another_wire_format_is_refused_naming_both_versions(prefect_api, counted, tmp_path):
    older = {k: v for k, v in counted.items() if k != "wire"}  # as written before the kit had one
    with pytest.raises(WireMismatch, match=f"has wire format 0, but this component \\(stepkit {stepkit.__version__}\\) "
                       f"reads wire format {WIRE}: redeploy the component that wrote it"):  # fmt: skip
        check_wire(older)
    newer = {**counted, "wire": WIRE + 1}
    with pytest.raises(WireMismatch, match=f"has wire format {WIRE + 1}, .* reads wire format {WIRE}: redeploy this"):
        check_wire(newer)

    @step
    def passing(data: Dataset) -> Output:
        return Output(data.ref, [], "")

    state = passing(data=newer, out=RunLayout.of("r1").step("passing"), return_state=True)
    with pytest.raises(WireMismatch, match=f"wire format {WIRE + 1}, .*reads wire format {WIRE}"):
        state.result()


def test_the_main_flow_refuses_a_result_from_a_step_built_with_an_older_kit(counted, tmp_path):
    """A step redeployed before the kit had a wire format returns references without one."""
    out = f"counted://{tmp_path}/runs/r1/subflow"
    old_output = {k: v for k, v in counted.items() if k != "wire"}
    result = {"output": old_output, "summary": [], "report": "", "image": "registry.example.com/subflow:old"}
    with atomic_write(stepkit.result_uri(out)) as file:
        file.write(json.dumps(result).encode())
    run = FlowRun(name="old-subflow", flow_id=counted["sha256"][:32], state=Completed())
    with pytest.raises(steps.PipelineError) as failure:
        steps.step_result(steps.ChildRun("subflow/subflow", {"data": counted}, out), run)
    message = str(failure.value)
    assert message.startswith("step subflow/subflow (run 'old-subflow'): reference counted://")
    assert f"has wire format 0, but the main flow (stepkit {stepkit.__version__}) reads wire format {WIRE}" in message


def test_the_main_flow_takes_a_steps_result_from_its_own_directory_and_its_image_from_its_worker(counted, tmp_path):
    out = f"counted://{tmp_path}/runs/r1/subflow"
    run = FlowRun(name="a-step", flow_id=counted["sha256"][:32], state=Completed(), tags=["image:reg/subflow@sha256:1"])
    task = steps.ChildRun("subflow/subflow", {"data": counted}, out)
    with pytest.raises(steps.PipelineError, match=r"completed but stored no result at .*/subflow/result.json"):
        steps.step_result(task, run)
    result = {"output": counted, "summary": [], "report": "", "image": "a lie"}  # its input, passed on
    with atomic_write(stepkit.result_uri(out)) as file:
        file.write(json.dumps(result).encode())
    assert steps.step_result(task, run)["image"] == "reg/subflow@sha256:1"
    elsewhere = {**counted, "uri": f"counted://{tmp_path}/runs/r2/input.parquet"}
    with atomic_write(stepkit.result_uri(out)) as file:
        file.write(json.dumps({**result, "output": elsewhere}).encode())
    with pytest.raises(steps.PipelineError, match="runs/r2/input.parquet, outside its output directory"):
        steps.step_result(task, run)


def test_the_run_layout_is_defined_once(monkeypatch):
    monkeypatch.setenv("PIPELINE_DATA_URL", "s3://bucket/data/")
    layout = RunLayout.of("abc")
    assert layout.dir == "s3://bucket/data/runs/abc"
    assert (layout.input, layout.output) == (f"{layout.dir}/input", f"{layout.dir}/output.json")
    assert layout.step("subflow/subflow") == f"{layout.dir}/subflow"
    assert layout.step("validate/validate", 2) == f"{layout.dir}/validate/part-00002"
    assert run_id_of(f"{layout.step('validate/validate')}/x.parquet") == "abc" and run_id_of("s3://b/x") is None
    monkeypatch.delenv("PIPELINE_DATA_URL")
    with pytest.raises(RuntimeError, match="PIPELINE_DATA_URL is not set"):
        RunLayout.of("abc")


def test_open_verified_names_a_missing_object(tmp_path):
    ref = DataRef(wire=WIRE, uri=f"file://{tmp_path}/gone.parquet", rows=1, columns=["a"], bytes=1, sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="stored object missing: file://.*gone.parquet"), open_verified(ref):
        pass


def test_batches_are_sized_by_bytes_not_rows(tmp_path):
    wide = pa.table({f"c{i}": [float(j) for j in range(20_000)] for i in range(50)})  # 8 MB in 20,000 rows
    write_parquet(wide, f"file://{tmp_path}/wide.parquet")
    found = list(stepkit.batches(pq.ParquetFile(tmp_path / "wide.parquet"), 1 << 20))
    assert sum(batch.num_rows for batch in found) == 20_000 and len(found) >= 8
    assert max(batch.nbytes for batch in found) <= 1 << 20


def test_a_step_of_two_inputs_takes_each_by_name_and_checks_what_it_declares(prefect_api, run_dir):
    left = write_parquet(pa.table({"k": ["a", "b"], "n": [1, 2]}), f"file://{run_dir}/left.parquet")
    right = write_parquet(pa.table({"k": ["a", "b"], "m": [0.5, 1.5]}), f"file://{run_dir}/right.parquet")

    @step(requires={"left": {"k": "string", "n": "int64"}, "right": {"k": "string"}}, produces={"n": "int64"})
    def joined(left: Dataset, right: Dataset, out: Out, lie: bool = False) -> Output:
        table = left.read().join(right.read(), "k").sort_by("k")
        table = table.drop_columns(["n"]) if lie else table
        return Output(out.write_table(table, "joined.parquet"), [{"rows": table.num_rows}], "joined")

    requires = {"left": {"k": "string", "n": "int64"}, "right": {"k": "string"}}
    assert joined.contract == Contract(("left", "right"), requires, {"n": "int64"})
    assert list(joined.parameters.properties)[:3] == ["left", "right", "out"]
    out = RunLayout.of("r1").step("joined")
    result = joined(left=left, right=right, out=out)
    assert pq.read_table(result["output"]["uri"].removeprefix("file://")).to_pylist() == [
        {"k": "a", "n": 1, "m": 0.5}, {"k": "b", "n": 2, "m": 1.5}
    ]  # fmt: skip
    state = joined(left=right, right=left, out=out, return_state=True)  # right has no n
    short = r"step joined: input left \(.*right.parquet\) does not hold what it requires: 'n' \(int64\) is missing"
    with pytest.raises(ValueError, match=short):
        state.result()
    state = joined(left=left, right=right, out=out, lie=True, return_state=True)
    lie = r"step joined declares what it produces, but its output .* does not hold it: 'n' \(int64\) is missing"
    with pytest.raises(ValueError, match=lie):
        state.result()
    with pytest.raises(TypeError, match=r"requires names \['middle'\], which are not among the step's inputs"):
        step(requires={"middle": {"k": "string"}})(lambda left, right: None)
