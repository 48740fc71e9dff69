"""Unit tests of the main flow component's tasks, without Docker."""

import http.server
import json
import threading

import pytest
from conftest import IRIS, load_component

main_flow = load_component("main_flow")


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on loopback serving files from tmp_path."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_fetch_default_source_is_the_shipped_iris_data():
    records = main_flow.fetch.fn("data/iris.csv")
    assert len(records) == 150
    assert records[0] == {
        "sepal_length": "5.1",
        "sepal_width": "3.5",
        "petal_length": "1.4",
        "petal_width": "0.2",
        "species": "setosa",
    }


def test_fetch_over_http(http_server, tmp_path):
    (tmp_path / "iris.csv").write_bytes(IRIS.read_bytes())
    assert main_flow.fetch.fn(f"{http_server}/iris.csv") == main_flow.fetch.fn(str(IRIS))


def test_fetch_reports_http_errors(http_server):
    with pytest.raises(ValueError, match="cannot fetch source .*404"):
        main_flow.fetch.fn(f"{http_server}/missing.csv")


def test_fetch_reports_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="source file not found: .*nope.csv"):
        main_flow.fetch.fn(str(tmp_path / "nope.csv"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "missing or blank header"),
        ("a,,c\n1,2,3\n", "missing or blank header"),
        ("a,b\n1,2\n3\n", "line 3 has a different number of fields"),
        ("a,b\n1,2,3\n", "line 2 has a different number of fields"),
        ("a,b\n", "empty dataset"),
    ],
)
def test_parse_csv_rejects_malformed_and_empty_data(text, message):
    with pytest.raises(ValueError, match=message):
        main_flow.parse_csv(text, "test.csv")


def test_store_output_writes_json_atomically(tmp_path):
    output = {"rows": 3, "summary": [{"g": "x"}]}
    path = main_flow.store_output.fn(output, str(tmp_path / "out"), "run-1")
    assert json.loads(path.read_text()) == output
    assert [p.name for p in path.parent.iterdir()] == ["run-1.json"]


def test_store_output_leaves_no_partial_file_on_failure(tmp_path):
    (tmp_path / "run-1.json").write_text('{"old": true}')
    with pytest.raises(TypeError):
        main_flow.store_output.fn({"bad": object()}, str(tmp_path), "run-1")
    assert [p.name for p in tmp_path.iterdir()] == ["run-1.json"]
    assert json.loads((tmp_path / "run-1.json").read_text()) == {"old": True}
