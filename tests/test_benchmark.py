"""A smoke run of the benchmark (one run of each figure, small): it runs on a stack of its own, and
every run in it is correct. It asks for `stack` so the user's stack is checked around it too."""

import json
import sys

import pytest
from harness import ROOT

pytestmark = pytest.mark.e2e


def test_benchmark_smoke(stack, tmp_path):
    out, chart = tmp_path / "results.json", tmp_path / "sizes.png"
    script = str(ROOT / "bench" / "benchmark.py")
    proc = stack.sh(sys.executable, script, "--smoke", "--out", str(out), "--chart", str(chart), timeout=3600)
    results = json.loads(out.read_text())
    assert results["floor"]["pipeline"] > 0
    for design in ("docker", "process"):
        hops = results["latency"][design]
        assert 0 < hops["subflow: running to completed"]["median"] < hops["trigger to completed"]["median"]
        assert results["throughput"]["2"][design]["correct"] == 2
        assert results["cpu"]["one at a time"][design]["total"] > 0 < results["cpu"]["at once"][design]["total"]
        assert results["polling"]["1.0"][design]["median"] > 0
    assert all(sample["correct"] for store in results["sizes"].values() for s in store.values() for sample in s)
    assert results["redeploy"]["median"] > 0
    assert "| trigger to completed |" in proc.stdout and chart.stat().st_size > 10_000
