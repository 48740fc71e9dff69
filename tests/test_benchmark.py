"""A smoke run of the benchmark (one run per figure): it runs, and every run in it is correct."""

import json
import sys

import pytest
from e2e import ROOT, sh

pytestmark = pytest.mark.e2e

BASELINE = ["docker", "compose", "-f", "docker-compose.yml", "-f", "bench/compose.baseline.yml"]


def test_benchmark_smoke(stack, tmp_path):
    out = tmp_path / "results.json"
    try:
        proc = sh(
            sys.executable, str(ROOT / "bench" / "benchmark.py"),
            "--runs", "1", "--concurrency", "1", "--redeploys", "1", "--out", str(out),
            timeout=1800,
        )  # fmt: skip
    finally:  # the baseline's workers would keep the network busy for later `down`s
        sh(*BASELINE, "rm", "-sf", "process-worker-flow", "process-worker-subflow")
    results = json.loads(out.read_text())
    for design in ("docker", "process"):
        hops = results["latency"][design]
        assert 0 < hops["sub running->completed"]["median"] < hops["total"]["median"]
        assert results["throughput"]["1"][design]["correct"] == 1
    assert results["redeploy"]["median"] > 0
    assert "| total (s) |" in proc.stdout and "docker/process" in proc.stdout
