"""Unit tests of the main flow's ingest, confinement and store code: real files, a real HTTP
server on loopback and a real S3 endpoint (moto's server), no Docker."""

import gzip
import hashlib
import http.server
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from prefect import flow, get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
from prefect.runtime import flow_run
from prefect.states import Completed, Crashed, Failed

from conftest import IRIS
from main_flow import cache, plan, sources, steps
from main_flow import ingest as component
from main_flow.progress import Progress
from stepkit import WIRE, DataRef, RunLayout, atomic_write, dataset_of, parts_of, result_uri, verify, write_parquet
from stepkit.graph import graph_of


def settings(**values) -> sources.Settings:
    """The main flow's settings for a test: the shipped data directory unless told otherwise."""
    return sources.Settings(**{"source_dir": IRIS.parent, **values})


def ingest(source: str, store: Path, config: sources.Settings | None = None, **limits) -> DataRef:
    limits = {**LIMITS, **limits}
    return component.ingest.fn(source, f"file://{store}/input", config or settings(), **limits)


LIMITS = {"max_bytes": 1 << 30, "timeout_s": 60, "max_columns": 1000, "part_rows": 1_000_000}


def empty(store: Path) -> bool:
    """Nothing half-written: no object, no partial file."""
    return not any(path.is_file() for path in store.rglob("*"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    return directory


@pytest.fixture
def http_server(tmp_path: Path):
    """A real HTTP server on loopback: files from tmp_path, plus redirects and a slow answer."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self):
            if self.path.startswith("/loop"):
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.end_headers()
            elif self.path == "/to-iris":
                self.send_response(301)
                self.send_header("Location", "/iris.csv")
                self.end_headers()
            elif self.path == "/bomb.csv":  # 4.6 kB that a decoding client would inflate to 1 GiB
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip, gzip")
                self.end_headers()
                self.wfile.write(b"\x1f\x8b" + b"\0" * 4600)
            elif self.path == "/slow.csv":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"a,b\n")
                for _ in range(50):
                    self.wfile.write(b"1,2\n" * 1000)
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    (tmp_path / "iris.csv").write_bytes(IRIS.read_bytes())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def loopback(server: str) -> sources.Settings:
    """Settings that allow the test server on loopback, as an operator allows a private host."""
    return settings(source_allow=[server])


def test_ingest_converts_the_shipped_iris_data_to_parquet(tmp_path):
    ref = ingest("iris.csv", tmp_path)
    stored = tmp_path / "input" / "part-00000.parquet"
    table = pq.read_table(stored)
    assert ref["rows"] == table.num_rows == 150
    assert ref["columns"] == table.schema.names == [
        "sepal_length", "sepal_width", "petal_length", "petal_width", "species"
    ]  # fmt: skip
    assert table.column("sepal_length")[0].as_py() == 5.1
    assert ref["bytes"] == stored.stat().st_size
    assert ref["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert [p.name for p in stored.parent.iterdir()] == ["part-00000.parquet"]  # no partial file left


def test_ingest_writes_parts_of_part_rows_that_read_as_the_whole(tmp_path):
    ref = ingest("iris.csv", tmp_path / "a", part_rows=40)
    assert [p["rows"] for p in ref["parts"]] == [40, 40, 40, 30] and ref["rows"] == 150
    assert [p["uri"].rsplit("/", 1)[1] for p in ref["parts"]] == [f"part-0000{i}.parquet" for i in range(4)]
    assert ref["uri"] == f"file://{tmp_path}/a/input"
    ingest("iris.csv", tmp_path / "b")
    whole = pq.read_table(tmp_path / "b" / "input" / "part-00000.parquet")
    assert pq.read_table([p["uri"].removeprefix("file://") for p in ref["parts"]]) == whole
    assert ref == ingest("iris.csv", tmp_path / "a", part_rows=40)  # the same bytes again, part for part
    verify(ref)


def test_ingest_over_http_gives_the_same_data(http_server, tmp_path):
    ref = ingest(f"{http_server}/to-iris", tmp_path / "a", loopback(http_server))
    assert ref["sha256"] == ingest("iris.csv", tmp_path / "b")["sha256"]


def test_ingest_handles_a_utf8_byte_order_mark(data_dir, tmp_path):
    (data_dir / "bom.csv").write_bytes(b"\xef\xbb\xbf" + IRIS.read_bytes())
    ref = ingest("bom.csv", tmp_path, settings(source_dir=data_dir))
    assert ref["columns"][0] == "sepal_length" and ref["rows"] == 150


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "malformed dataset 'x.csv': no header row (the file is empty)"),
        (b"a,b\n", "empty dataset 'x.csv': a header but no data rows"),
        (b"a,b\n1,2\n3\n", "a row has a different number of fields than the header"),
        (b"a,,c\n1,2,3\n", "blank or repeated column names ['a', '', 'c']"),
        (b"a,a\n1,2\n", "blank or repeated column names ['a', 'a']"),
        (
            b"a,b\n" + b"1,2\n" * 1_200_000 + b"x,2\n",
            "a column changes type after the first rows (In CSV column #0",
        ),
    ],
)
def test_ingest_rejects_malformed_data_and_leaves_nothing(data_dir, tmp_path, text, message):
    (data_dir / "x.csv").write_bytes(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        ingest("x.csv", tmp_path / "store", settings(source_dir=data_dir))
    assert empty(tmp_path / "store")


def test_max_bytes_stops_a_file_and_a_download(http_server, tmp_path):
    store = tmp_path / "store"
    with pytest.raises(ValueError, match=r"source 'iris.csv' is larger than max_bytes=1000"):
        ingest("iris.csv", store, max_bytes=1000)
    with pytest.raises(ValueError, match=r"is \d+ bytes, over max_bytes=1000"):  # Content-Length
        ingest(f"{http_server}/iris.csv", store, loopback(http_server), max_bytes=1000)
    assert empty(store)


def test_an_encoded_download_is_refused_before_it_is_inflated(http_server, tmp_path):
    with pytest.raises(ValueError, match="Content-Encoding 'gzip, gzip': refused, its size could not be capped"):
        ingest(f"{http_server}/bomb.csv", tmp_path / "store", loopback(http_server))
    assert empty(tmp_path / "store")


def test_max_columns_refuses_a_wide_file(data_dir, tmp_path):
    (data_dir / "wide.csv").write_text(",".join(f"c{i}" for i in range(5000)) + "\n" + ",".join("1" * 5000) + "\n")
    with pytest.raises(ValueError, match="has 5000 columns, over max_columns=1000"):
        ingest("wide.csv", tmp_path / "store", settings(source_dir=data_dir))
    assert empty(tmp_path / "store")


def test_messages_never_show_credentials_or_signed_queries(http_server, tmp_path):
    port = http_server.rsplit(":", 1)[1]
    signed = f"http://user:hunter2@127.0.0.1:{port}/missing.csv?X-Amz-Signature=s3cr3t"
    with pytest.raises(ValueError) as refused:
        ingest(signed, tmp_path, loopback(http_server))
    assert str(refused.value) == f"cannot fetch source 'http://127.0.0.1:{port}/missing.csv': HTTP 404"


def test_the_download_connects_to_the_address_it_checked(http_server, tmp_path):
    """`localhost` is allowed by name here: the check resolves it once and the request goes there."""
    assert sources.check_url("http://localhost/x.csv", ["http://localhost/"]) in ("127.0.0.1", "::1")
    port = http_server.rsplit(":", 1)[1]
    ref = ingest(f"http://localhost:{port}/iris.csv", tmp_path, loopback(f"http://localhost:{port}"))
    assert ref["rows"] == 150


def test_a_download_past_its_deadline_fails(http_server, tmp_path):
    """The server takes 5 s to send it all: only the deadline can stop it after 1 s."""
    with pytest.raises(TimeoutError, match="was not read within fetch_timeout_s"):
        ingest(f"{http_server}/slow.csv", tmp_path / "store", loopback(http_server), timeout_s=1)
    assert empty(tmp_path / "store")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/etc/passwd", "is outside the data directory"),
        ("../main_flow.py", "is outside the data directory"),
        ("nope.csv", "source file not found: .*nope.csv"),
    ],
)
def test_file_sources_stay_in_the_data_directory(tmp_path, source, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ingest(source, tmp_path)


def test_a_symlink_out_of_the_data_directory_is_refused(data_dir, tmp_path):
    (data_dir / "escape.csv").symlink_to(IRIS)
    with pytest.raises(ValueError, match="outside the data directory"):
        ingest("escape.csv", tmp_path, settings(source_dir=data_dir))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "http://127.0.0.1:9/x.csv",
            r"non-public address 127.0.0.1; allow it with SOURCE_ALLOW \(e.g. http://127.0.0.1:9/\)",
        ),
        ("http://169.254.169.254/latest/meta-data", "non-public address 169.254.169.254"),
        ("http://10.1.2.3/x.csv", "non-public address 10.1.2.3"),
        ("http://localhost/x.csv", "non-public address"),
    ],
)
def test_url_sources_must_be_public_http(tmp_path, url, message):
    with pytest.raises(ValueError, match=message):
        ingest(url, tmp_path)


def test_redirects_are_checked_and_limited(http_server, tmp_path):
    with pytest.raises(ValueError, match="more than 5 redirects"):
        ingest(f"{http_server}/loop", tmp_path, loopback(http_server))
    with pytest.raises(ValueError, match="cannot fetch source .*: HTTP 404"):
        ingest(f"{http_server}/missing.csv", tmp_path, loopback(http_server))


def test_unreachable_sources_are_transient(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(sources.SourceUnavailable, match=f"cannot fetch source 'http://127.0.0.1:{port}/x.csv'"):
        ingest(f"http://127.0.0.1:{port}/x.csv", tmp_path, loopback(f"http://127.0.0.1:{port}"))


def test_an_unreachable_store_fails_the_ingest_after_two_retries_naming_it(prefect_api, monkeypatch):
    """Prefect's retries of the real task, against an S3 endpoint that refuses connections."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
        "AWS_MAX_ATTEMPTS": "1",
    }
    for name, value in env.items():  # AWS_MAX_ATTEMPTS: botocore's own 5 tries per attempt take seconds
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()

    @flow
    def load() -> DataRef:
        task = component.ingest.with_options(retry_delay_seconds=0)
        return task("iris.csv", "s3://pipeline/runs/unit/input", settings(), **LIMITS)

    state = load(return_state=True)
    assert state.is_failed()
    assert "cannot reach the data store to write s3://pipeline/runs/unit/input" in state.message
    assert f'Could not connect to the endpoint URL: "{endpoint}/' in state.message
    with get_client(sync_client=True) as client:
        (ingested,) = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert ingested.run_count == 3  # retries=2: the store may come back; bad data would not


@pytest.mark.parametrize(
    ("outcomes", "message"),
    [
        (["Crashed", "Crashed", "Crashed"], "ended Crashed: exit 137 (attempt 3 of 3)"),
        (["Crashed", "Failed"], "ended Failed: bad row (attempt 2 of 3)"),
        (["Failed"], "ended Failed: bad row"),
    ],
)
def test_a_crashed_step_starts_again_up_to_its_retries_a_failed_one_never(prefect_api, outcomes, message):
    """The real server; this test plays the worker, ending each run of the step as `outcomes` say."""
    with get_client(sync_client=True) as client:
        step_flow = client.create_flow_from_name(f"step-{len(outcomes)}")
        client.create_deployment(step_flow, "step")
    name, played = f"step-{len(outcomes)}/step", []

    def worker() -> None:
        states = {"Crashed": Crashed(message="exit 137"), "Failed": Failed(message="bad row")}
        with get_client(sync_client=True) as client:
            while len(played) < len(outcomes):
                for run in client.read_flow_runs(deployment_filter=deployment_named(client, name)):
                    if run.id not in {p.id for p in played}:
                        client.set_flow_run_state(run.id, states[outcomes[len(played)]], force=True)
                        played.append(run)
                time.sleep(0.05)

    @flow
    def main() -> None:
        task = steps.ChildRun(name, {"data": {"uri": "file:///nowhere", "rows": 1}}, "out")
        steps.run_tasks([task], {}, steps.Limits(timeout_s=60, at_once=1), lambda *_: None)

    threading.Thread(target=worker, daemon=True).start()
    state = main(return_state=True)
    assert state.is_failed() and message in state.message, state.message
    assert len(played) == len(outcomes)
    assert [run.tags for run in sorted(played, key=lambda run: run.created)] == [
        [f"attempt-{n}"] if n > 1 else [] for n in range(1, len(outcomes) + 1)
    ]


def test_a_failed_step_stops_only_the_steps_that_need_it(prefect_api, run_dir):
    """The real server; the test plays the workers: `fails` ends Failed, `beside` (its own branch)
    completes with its input passed on, and `after`, which needs `fails`, is never started."""
    outcomes = {"fails/graph": Failed(message="bad row"), "beside/graph": Completed(), "after/graph": Completed()}
    with get_client(sync_client=True) as client:
        for name in outcomes:
            client.create_deployment(client.create_flow_from_name(name.split("/")[0]), "graph")
        ids = {client.read_deployment_by_name(name).id: name for name in outcomes}
    ours = DeploymentFilter(id=DeploymentFilterId(any_=list(ids)))
    stored = write_parquet(pa.table({"a": [1, 2]}), f"file://{run_dir}/input.parquet")
    played, finished = set(), threading.Event()

    def workers() -> None:
        with get_client(sync_client=True) as client:
            while not finished.is_set():
                for run in client.read_flow_runs(deployment_filter=ours):
                    if run.id not in played:
                        played.add(run.id)
                        with atomic_write(result_uri(run.parameters["out"])) as file:  # its input, passed on
                            result = {"output": run.parameters["data"], "summary": [], "report": "", "image": "-"}
                            file.write(json.dumps(result).encode())
                        client.set_flow_run_state(run.id, outcomes[ids[run.deployment_id]], force=True)
                time.sleep(0.05)

    @flow
    def main() -> None:
        graph = graph_of(
            ["fails/graph", {"step": "beside/graph", "needs": []}, {"step": "after/graph", "needs": ["fails"]}]
        )
        with Progress(flow_run.id, {n: node.needs for n, node in graph.items()}) as progress:
            steps.run_graph(graph, stored, RunLayout.of("r1"), {}, steps.Limits(60, 1), cache.Policy("r1"), progress)

    threading.Thread(target=workers, daemon=True).start()
    state = main(return_state=True)
    finished.set()
    assert state.is_failed()
    assert "step fails/graph (run " in state.message and "ended Failed: bad row" in state.message, state.message
    assert "steps ['after/graph'] not started: they need fails/graph" in state.message, state.message
    with get_client(sync_client=True) as client:
        runs = {ids[run.deployment_id]: run.state.name for run in client.read_flow_runs(deployment_filter=ours)}
    assert runs == {"fails/graph": "Failed", "beside/graph": "Completed"}  # after/graph: never created


def deployment_named(client, name: str) -> DeploymentFilter:
    return DeploymentFilter(id=DeploymentFilterId(any_=[client.read_deployment_by_name(name).id]))


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's standalone S3 server in a subprocess: the real protocol, on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    fs = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": url})
    deadline = time.monotonic() + 30
    while True:
        try:
            fs.mkdir("pipeline")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield url
    server.terminate()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()


def test_ingest_into_s3_matches_the_file_store(s3_env, tmp_path):
    ref = component.ingest.fn("iris.csv", "s3://pipeline/runs/unit/input", settings(), **LIMITS)
    assert ref["sha256"] == ingest("iris.csv", tmp_path)["sha256"]
    verify(ref)
    assert s3_env.ls("pipeline/runs/unit/input") == ["pipeline/runs/unit/input/part-00000.parquet"]


def test_a_failed_upload_leaves_no_object(s3_env, data_dir):
    """Also the parts committed before the bad row: a failed ingest leaves nothing."""
    (data_dir / "ragged.csv").write_bytes(b"a,b\n" + b"1,2\n" * 300_000 + b"3\n")
    limits = {**LIMITS, "part_rows": 100_000}
    with pytest.raises(ValueError, match="different number of fields"):
        component.ingest.fn("ragged.csv", "s3://pipeline/runs/failed/input", settings(source_dir=data_dir), **limits)
    assert s3_env.find("pipeline/runs/failed") == []


def test_the_source_identity_is_cheap_and_follows_the_bytes(http_server, data_dir, tmp_path):
    url = f"{http_server}/iris.csv"
    first = sources.identity.fn(url, loopback(http_server), 10)
    assert first["url"] == url and first["bytes"] == IRIS.stat().st_size and "last-modified" in first
    (tmp_path / "iris.csv").write_bytes(IRIS.read_bytes() + b"5.0,3.0,1.0,0.2,setosa\n")
    assert sources.identity.fn(url, loopback(http_server), 10) != first
    (data_dir / "a.csv").write_text("a\n1\n")
    config = settings(source_dir=data_dir)
    digest = hashlib.sha256(b"a\n1\n").hexdigest()
    assert sources.identity.fn("a.csv", config, 10) == {"file": "a.csv", "sha256": digest}
    with pytest.raises(ValueError, match="non-public address"):
        sources.identity.fn(url, settings(), 10)  # the source's checks come first


def test_a_mapped_step_gets_contiguous_partitions_of_about_equal_rows():
    parts = [
        DataRef(
            wire=WIRE, uri=f"s3://b/runs/r/input/part-{i}.parquet", rows=10, columns=["a"], bytes=1, sha256=f"{i}" * 64
        )
        for i in range(10)
    ]
    data = dataset_of(parts)
    four = plan.partitions(data, {"step": "v/v", "partitions": 4})
    assert [p["rows"] for p in four] == [30, 20, 30, 20]
    assert [part for p in four for part in parts_of(p)] == parts  # in order, each part once
    assert [p["rows"] for p in plan.partitions(data, {"step": "v/v", "rows_per_partition": 50})] == [50, 50]
    assert len(plan.partitions(data, {"step": "v/v", "partitions": 20})) == 10  # a part is never split
    assert plan.partitions(parts[0], {"step": "v/v", "partitions": 4}) == [parts[0]]
    assert plan.partitions(data, {"step": "v/v"}) is None  # not mapped


# --- Sources as users have them: formats by content, schemes by the allow-list ----------------------


@pytest.fixture
def inbox(tmp_path, monkeypatch) -> Path:
    """The inbox of a file data store at tmp_path/store (PIPELINE_DATA_URL)."""
    monkeypatch.setenv("PIPELINE_DATA_URL", f"file://{tmp_path}/store")
    (directory := tmp_path / "store" / "inbox").mkdir(parents=True)
    return directory


def compressed(data: bytes, codec: str) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, codec) as stream:
        stream.write(data)
    return sink.getvalue().to_pybytes()


def test_gzip_and_zstd_csv_give_the_csv_s_parquet_byte_for_byte(inbox, tmp_path):
    want = ingest("iris.csv", tmp_path / "csv")
    for name, codec in (("iris.csv.gz", "gzip"), ("iris.csv.zst", "zstd"), ("iris-no-hint", "gzip")):
        (inbox / name).write_bytes(compressed(IRIS.read_bytes(), codec))
        assert ingest(f"file://{inbox}/{name}", tmp_path / name)["sha256"] == want["sha256"], name


def test_parquet_is_kept_as_it_is_if_it_fits_in_a_part_else_re_encoded_into_parts(inbox, tmp_path):
    table = pq.read_table(ingest("iris.csv", tmp_path / "csv")["uri"][len("file://") :])
    pq.write_table(table, inbox / "iris.parquet", compression="zstd")  # not how ingest writes it
    source = f"file://{inbox}/iris.parquet"
    whole = ingest(source, tmp_path / "one")
    assert whole["uri"] == f"file://{tmp_path}/one/input/part-00000.parquet"
    assert whole["sha256"] == hashlib.sha256((inbox / "iris.parquet").read_bytes()).hexdigest()  # byte for byte
    parts = ingest(source, tmp_path / "four", part_rows=40)
    assert [p["rows"] for p in parts["parts"]] == [40, 40, 40, 30]
    assert pq.read_table([p["uri"][7:] for p in parts["parts"]]) == table
    assert sorted(p.name for p in (tmp_path / "four" / "input").iterdir()) == [
        f"part-0000{i}.parquet" for i in range(4)
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("x.csv", gzip.compress(b"a\n1\n"), r"'file://.*/x.csv' is named .csv \(CSV\) but its content is gzip"),
        ("x.parquet", b"a\n1\n", r"is named .parquet \(Parquet\) but its content is CSV"),
        ("x.csv.gz", compressed(b"a\n1\n", "zstd"), r"is named .gz \(gzip\) but its content is zstd"),
        ("x.zip", b"PK\x03\x04" + b"\0" * 60, "is a zip archive: compress a CSV with gzip or zstd instead"),
        ("x.csv.gz", b"\x1f\x8b" + b"\0" * 100, "is not valid gzip data"),
        ("x.parquet", b"PAR1" + b"\0" * 100, "malformed dataset"),
        ("x.csv.zst", compressed(b"a,b\n1,2\n3\n", "zstd"), "a row has a different number of fields"),
        ("x.parquet", b"", "no header row"),
        ("x.jsonl", b'{"a": 1, "b": 2}\n{"a": 3, "b": 4}\n', "is JSON: not read; convert it to CSV or Parquet"),
        ("x.csv", b'\n{"a": 1, "b": 2}\n', r"is named .csv \(CSV\) but its content is JSON"),
    ],
)
def test_a_source_that_is_not_what_it_says_is_refused_and_leaves_nothing(inbox, tmp_path, name, content, message):
    (inbox / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        ingest(f"file://{inbox}/{name}", tmp_path / "out")
    assert empty(tmp_path / "out")


def test_an_empty_parquet_file_is_refused_and_leaves_nothing(inbox, tmp_path):
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), inbox / "empty.parquet")
    with pytest.raises(ValueError, match="empty dataset"):
        ingest(f"file://{inbox}/empty.parquet", tmp_path / "out")
    assert empty(tmp_path / "out")


def test_a_compressed_source_is_capped_on_its_decompressed_size(inbox, tmp_path):
    (inbox / "big.csv.gz").write_bytes(gzip.compress(b"a,b\n" + b"1,2\n" * 500_000))  # 2 MB in 6 kB
    with pytest.raises(ValueError, match=r"'file://.*/big.csv.gz' is larger than max_bytes=1000000 once decompressed"):
        ingest(f"file://{inbox}/big.csv.gz", tmp_path / "out", max_bytes=1_000_000, part_rows=100_000)
    assert not (tmp_path / "out" / "input").exists()  # the parts already written, and their directory


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("ftp://example.com/x.csv", r"is refused: sources are public http\(s\) URLs, files in the store's inbox"),
        ("file:///etc/passwd", r"or under a prefix of SOURCE_ALLOW \(nothing else\)"),
        ("s3://pipeline/runs/r1/input/part-00000.parquet", "SOURCE_ALLOW"),
        ("file://{store}/runs/r1/output.json", "is refused"),  # the store, but not its inbox
        ("file://{store}/inbox/../runs/r1/output.json", "a path with '..', '::', '[?]', '#' or '%' is refused"),
        ("simplecache::file://{store}/inbox/x.csv", "is refused"),
    ],
)
def test_sources_outside_the_inbox_and_source_allow_are_refused(inbox, tmp_path, source, message):
    with pytest.raises(ValueError, match=message):
        ingest(source.format(store=inbox.parent), tmp_path / "out")


def test_source_allow_admits_its_prefixes_not_their_neighbours(s3_env, inbox, tmp_path):
    s3_env.mkdir("sources")
    s3_env.mkdir("sources2")
    s3_env.pipe("sources/raw/iris.csv.gz", gzip.compress(IRIS.read_bytes()))
    s3_env.pipe("sources2/raw/iris.csv", IRIS.read_bytes())
    config = settings(source_allow="s3://sources, http://files.internal:8080")  # as in .env
    assert config.source_allow == ["s3://sources/", "http://files.internal:8080/"]
    ref = ingest("s3://sources/raw/iris.csv.gz", tmp_path / "s3", config)  # another bucket than the store's
    assert ref["sha256"] == ingest("iris.csv", tmp_path / "csv")["sha256"]
    with pytest.raises(ValueError, match=r"SOURCE_ALLOW \(s3://sources/, http://files.internal:8080/\)"):
        ingest("s3://sources2/raw/iris.csv", tmp_path / "no", config)
    with pytest.raises(FileNotFoundError, match="source not found: s3://sources/raw/missing.csv"):
        ingest("s3://sources/raw/missing.csv", tmp_path / "no", config)
    with pytest.raises(ValueError, match=r"over max_bytes=100"):
        ingest("s3://sources/raw/iris.csv.gz", tmp_path / "no", config, max_bytes=100)
    first = sources.identity.fn("s3://sources/raw/iris.csv.gz", config, 10)
    assert first["ETag"] and first["bytes"] == s3_env.size("sources/raw/iris.csv.gz")
    s3_env.pipe("sources/raw/iris.csv.gz", gzip.compress(IRIS.read_bytes() + b"5.0,3.0,1.0,0.2,setosa\n"))
    assert sources.identity.fn("s3://sources/raw/iris.csv.gz", config, 10) != first
    with pytest.raises(ValueError, match="is not a URL prefix such as s3://bucket/raw/"):
        settings(source_allow="our-bucket/raw")
