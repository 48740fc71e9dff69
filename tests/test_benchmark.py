"""The benchmark works: every stage runs once, at its smallest size, on the e2e tests' stack (the
process baseline beside it while latency runs), and writes its results, its charts and its tables. Its figures are
`make bench`'s business, not this test's; the READMEs show those of bench/results.json as generated."""

import json

import pytest

from bench import report
from bench.__main__ import run
from bench.stack import Bench
from bench.stages import FORMS, STAGES, Plan
from tests.harness import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_readmes_show_the_committed_results_as_generated():
    """What `python -m bench --report bench/results.json` writes is what the READMEs say: no figure typed."""
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    assert results["plan"] == "full", "the READMEs show a full `make bench` run"
    assert report.report(results) in (ROOT / "bench" / "README.md").read_text()
    assert report.summary(results) in (ROOT / "README.md").read_text()


@pytest.mark.e2e
def test_every_stage_runs_once_and_writes_its_results_charts_and_tables(stack, tmp_path, capsys):
    results = run(Bench.on(stack), Plan.smoke(), list(STAGES), tmp_path / "results.json", tmp_path)
    with capsys.disabled():  # where the smoke's time goes, in CI's log
        print(f"\n[measure] the smoke's stages, seconds: {results['seconds']}")
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results, default=str))
    assert list(results["seconds"]) == list(STAGES) and results["plan"] == "smoke"
    # Each stage made its one sample of each figure, at its smallest size, every run correct.
    assert {
        c: results["floor"][c]["start+imports"]["n"] for c in ("main_flow", "validate", "subflow")
    } == dict.fromkeys(("main_flow", "validate", "subflow"), 1)
    for design in ("docker", "process"):  # the baseline once, in latency
        figures = results["latency"][design]
        assert figures["trigger to completed"]["n"] == 1 and figures["cpu"]["total"]["n"] == 1, figures
    assert list(results["throughput"]["1"]) == ["docker"]
    assert results["throughput"]["1"]["docker"]["correct"] == 1 and results["throughput"]["1"]["docker"]["cpu"]
    assert results["cached"]["trigger to completed"]["n"] == 1
    interval = stack.env()["PREFECT_WORKER_QUERY_SECONDS"]  # the smoke's one: .env's, idle (latency runs at it)
    assert list(results["polling"]) == [interval] and "prefect-server" in results["polling"][interval]["idle"]
    assert [sample["correct"] for sample in results["sizes"]["file"]["1000"]] == [True]
    assert [results["formats"]["1000"][form]["correct"] for form in FORMS] == [1, 1, 1]
    assert {p: figures["seconds"]["n"] for p, figures in results["mapped"]["1000"].items()} == {"2": 1}
    assert {run: figures["n"] for run, figures in results["diamond"].items()} == dict.fromkeys(
        ("diamond", "sequence", "longest path"), 1
    )
    assert results["redeploy"]["n"] == 1
    assert {way: figures["n"] for way, figures in results["authority"]["write a log"].items()} == {
        "per-run authority": 5, "shared credential": 5
    }  # fmt: skip
    assert [figures["n"] for figures in results["cancel"].values()] == [1, 1]
    # Its charts, a table per figure, and the summary, each written between its markers.
    assert sorted(results["charts"]) == ["cancel.png", "mapped.png", "sizes.png"]
    assert all((tmp_path / name).read_bytes().startswith(PNG) for name in results["charts"])
    tables, summary = report.report(results), report.summary(results)
    for name, table in report.TABLES.items():
        assert "\n".join(table(results)) in tables, name
    assert len(summary.splitlines()) == 7 and "1,000 rows: " in summary, summary
    for text, (start, end) in ((tables, report.TABLES_SLOT), (summary, report.SUMMARY_SLOT)):
        readme = tmp_path / "README.md"
        readme.write_text(f"# Benchmark\n\nprose\n\n{start}\nold\n{end}\n\nmore prose\n")
        report.write_into(readme, text, (start, end))
        written = readme.read_text()
        assert "old" not in written and text in written and written.endswith("more prose\n")
