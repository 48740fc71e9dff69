"""A smoke run of the benchmark (one run of each figure, small): it runs on a stack of its own, and
every run in it is correct. It asks for `stack` so the user's stack is checked around it too."""

import json

import pytest

pytestmark = pytest.mark.e2e


def test_benchmark_smoke(stack, tmp_path):
    out, chart = tmp_path / "results.json", tmp_path / "sizes.png"
    args = f"ARGS=--smoke --out {out} --chart {chart}"
    proc = stack.sh("make", "bench", args, timeout=3600, VENV=str(stack.venv))
    results = json.loads(out.read_text())
    floor = results["floor"]
    for component in ("main_flow", "validate", "subflow"):  # importing costs more than starting
        assert floor[component]["start"]["median"] < floor[component]["start+imports"]["median"]
    assert floor["pipeline"] == sum(floor[c]["start+imports"]["median"] for c in ("main_flow", "validate", "subflow"))
    # A pipeline run pays at least its three containers' start and imports.
    assert results["latency"]["docker"]["trigger to completed"]["median"] > floor["pipeline"]
    for design in ("docker", "process"):
        hops = results["latency"][design]
        assert hops["subflow: running to completed"]["median"] < hops["trigger to completed"]["median"]
        assert results["throughput"]["2"][design]["correct"] == 2
        for mode in ("one at a time", "at once"):
            cpu = results["cpu"][mode][design]
            assert cpu["prefect-server"] > 0 and cpu["total"] == pytest.approx(
                sum(v for k, v in cpu.items() if k != "total")
            )
        assert results["polling"]["1.0"][design]["n"] == 1
    assert all(sample["correct"] for store in results["sizes"].values() for s in store.values() for sample in s)
    assert results["redeploy"]["n"] == 1
    assert [f["correct"] for f in results["formats"]["1000"].values()] == [1, 1, 1]  # CSV, gzip CSV, Parquet
    assert results["cached"]["trigger to completed"]["n"] == 1  # the stage asserts its run reused every step
    assert [results["mapped"]["1000"][p]["seconds"]["n"] for p in ("1", "2")] == [1, 1]  # each run checked
    assert "| trigger to completed |" in proc.stdout and "| cached above the floor |" in proc.stdout
    assert chart.stat().st_size > 10_000 and chart.with_name("mapped.png").stat().st_size > 10_000
