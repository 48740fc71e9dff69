"""What the benchmark reads off a run: its hops from the server's state history, whether its output
is correct, and the CPU the stack spent (cgroup accounting through the Docker API)."""

import statistics
import time
from pathlib import Path
from typing import Any

from bench.stack import Bench
from tests.harness import engine

STEPS = ("validate", "subflow")
# The long-lived services whose CPU a design's pipeline runs cost: flow containers call the API
# through the gateway's flow listener and the authority; process flows, the gateway's admin one.
SERVICES = {
    "docker": ["prefect-server", "postgres", "gateway", "authority", "worker-flow", "worker-subflow"],
    "process": ["prefect-server", "postgres", "gateway", "process-main_flow", "process-validate", "process-subflow"],
    "before": ["prefect-server", "postgres", "gateway", "authority", "worker-flow", "worker-subflow"],
}


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and count of a figure's samples."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def timestamps(client: Any, run_id: Any) -> dict[str, float]:
    """First time the run entered each state type, in epoch seconds (server clock)."""
    seen: dict[str, float] = {}
    for state in sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp):
        seen.setdefault(state.type.value, state.timestamp.timestamp())
    return seen


def hops(bench: Bench, run: Any) -> dict[str, float]:
    """Total and per-hop seconds of a finished pipeline run, from the server's state history."""
    with bench.stack.api() as client:
        main = timestamps(client, run.id)
        children = {bench.stack.flow_name(c): timestamps(client, c.id) for c in bench.stack.children(run.id)}
    figures = {
        "trigger to completed": main["COMPLETED"] - main["SCHEDULED"],
        "main: scheduled to running": main["RUNNING"] - main["SCHEDULED"],
        "main: running to first step created": children[STEPS[0]]["SCHEDULED"] - main["RUNNING"],
    }
    for name in STEPS:
        step = children[name]
        figures[f"{name}: scheduled to pending"] = step["PENDING"] - step["SCHEDULED"]
        figures[f"{name}: pending to running"] = step["RUNNING"] - step["PENDING"]
        figures[f"{name}: running to completed"] = step["COMPLETED"] - step["RUNNING"]
    figures["between steps"] = children[STEPS[1]]["SCHEDULED"] - children[STEPS[0]]["COMPLETED"]
    figures["main: last step completed to completed"] = main["COMPLETED"] - children[STEPS[-1]]["COMPLETED"]
    return figures


def trigger_to_completed(bench: Bench, run: Any) -> float:
    with bench.stack.api() as client:
        seen = timestamps(client, run.id)
    return seen["COMPLETED"] - seen["SCHEDULED"]


def correct(bench: Bench, run: Any, summary: list[dict[str, Any]] | None = None) -> bool:
    """Completed, and the stored output holds the expected groups (the shipped Iris by default)."""
    if not run.state.is_completed():
        return False
    (result,) = [r for name, r in bench.stack.output(run)["results"].items() if name.startswith("subflow/")]
    if summary is None:
        return [g["count"] for g in result["summary"]] == [50, 50, 50]
    return [(g["species"], g["count"]) for g in result["summary"]] == [(g["species"], g["count"]) for g in summary]


# Where the kernel counts a container's CPU time, in nanoseconds (cgroup v1) or microseconds (v2).
CGROUP_CPU = [
    ("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage", 1e-9),
    ("/sys/fs/cgroup/docker/{id}/cpu.stat", 1e-6),
    ("/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat", 1e-6),
]


def container_cpu(bench: Bench) -> dict[str, float]:
    """Cumulative CPU-seconds of each long-lived container of the stack, from its cgroup."""
    client = engine()
    label = f"com.docker.compose.project={bench.stack.project}"
    services = {s for listed in SERVICES.values() for s in listed}  # not one-shot ones, which may be gone by now
    containers = client.containers.list(filters={"label": label})
    return {s: cgroup_cpu(c) for c in containers if (s := c.labels["com.docker.compose.service"]) in services}


def cgroup_cpu(container: Any) -> float:
    """A container's CPU-seconds so far: its cgroup's counter where this host has it (milliseconds to
    read), else Docker's stats (a second or two per call)."""
    for pattern, unit in CGROUP_CPU:
        path = Path(pattern.format(id=container.id))
        if path.is_file():
            text = path.read_text()
            value = text.split("usage_usec", 1)[1].split()[0] if "usage_usec" in text else text
            return int(value) * unit
    return container.stats(stream=False, one_shot=True)["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9


def daemon_cpu() -> float:
    """CPU-seconds of dockerd and containerd so far (they start every flow-run container), with the
    children each has reaped: a shim's `runc` for every container start and healthcheck probe."""
    total = 0.0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() in (
                "dockerd",
                "containerd",
                "containerd-shim",
                "containerd-shim-runc-v2",
            ):
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                total += sum(map(int, fields[11:15])) / 100  # utime, stime, cutime, cstime: clock ticks
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total


class CpuMeter:
    """CPU-seconds spent by each of a design's services, and by the Docker daemons, between
    `start()` and `per_run(n, outputs)`."""

    def __init__(self, bench: Bench, design: str):
        self.bench, self.design = bench, design

    def start(self) -> "CpuMeter":
        self.before, self.daemon = container_cpu(self.bench), daemon_cpu()
        return self

    def per_run(self, runs: int, outputs: list[dict[str, Any]]) -> dict[str, float]:
        after, daemon = container_cpu(self.bench), daemon_cpu() - self.daemon
        spent = {s: (after[s] - self.before[s]) / runs for s in SERVICES[self.design]}
        if self.design != "process":  # flow processes report their own; process flows are in their workers
            spent["flow containers"] = statistics.mean(
                o["cpu_seconds"] + sum(r["cpu_seconds"] for r in o["results"].values()) for o in outputs
            )
            spent["dockerd and containerd"] = daemon / runs
        return {**spent, "total": sum(spent.values())}


def idle_cpu(bench: Bench, window_s: float) -> dict[str, float]:
    """CPU-seconds per second of every service, and of the Docker daemons, with no run anywhere."""
    before, daemon, started = container_cpu(bench), daemon_cpu(), time.monotonic()
    time.sleep(window_s)  # a measurement window, not a wait for anything
    after, daemon, elapsed = container_cpu(bench), daemon_cpu() - daemon, time.monotonic() - started
    idle = {s: (after[s] - before[s]) / elapsed for s in after if s in before}  # the baseline's if it is up
    return {**idle, "dockerd and containerd": daemon / elapsed}
