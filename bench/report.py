"""The benchmark's tables, in markdown, from one results file: printed after a run, and written
between markers into bench/README.md (the tables) and README.md (a summary) by `python -m bench
--report bench/results.json`, so the figures there are never typed by hand."""

import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.measure import spread
from bench.stages import CANCELLED, COMPONENTS, KILLED

TABLES_SLOT = ("<!-- tables: python -m bench --report -->", "<!-- end of tables -->")
SUMMARY_SLOT = ("<!-- summary: python -m bench --report -->", "<!-- end of summary -->")


def fmt(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]


def floor(results: dict[str, Any]) -> list[str]:
    fl = results["floor"]
    rows = [[c, fmt(fl[c]["start"]), fmt(fl[c]["start+imports"])] for c in COMPONENTS]
    rows.append(["**the pipeline: three serial hops**", "", f"**{fl['pipeline']:.2f}**"])
    return ["**The floor** (s): a fresh container, and one importing the engine and the component.", ""] + table(
        ["image", "`docker run true`", "run + imports"], rows
    )


def latency(results: dict[str, Any]) -> list[str]:
    lat, designs = results["latency"], list(results["latency"])
    keys = [k for k in lat["docker"] if k != "cpu"]
    rows = []
    for key in keys:
        cells = [fmt(lat[d][key]) for d in designs]
        base = lat["process"][key]["median"] if "process" in lat else 0
        ratio = f"{lat['docker'][key]['median'] / base:.2f}" if base > 0 else ""
        rows.append([key, *cells, ratio])
    if floor_s := results.get("floor", {}).get("pipeline"):
        rows.append(
            ["trigger to completed / floor", f"{lat['docker']['trigger to completed']['median'] / floor_s:.2f}"]
        )
    return ["**Latency** (s), one pipeline run, designs alternating run by run.", ""] + table(
        ["figure", *designs, "docker/process"], rows
    )


def cpu(results: dict[str, Any]) -> list[str]:
    columns = {f"{d}, one at a time": by["cpu"] for d, by in results["latency"].items()}
    for n, by in results.get("throughput", {}).items():
        columns |= {f"{d}, {n} at once": figures["cpu"] for d, figures in by.items() if figures["cpu"]}
    keys = list(dict.fromkeys(k for figures in columns.values() for k in figures if k != "total")) + ["total"]

    def cell(figures: dict[str, Any], key: str) -> str:
        value = figures.get(key)
        return "-" if value is None else f"{value['median'] if isinstance(value, dict) else value:.2f}"

    rows = [[key, *(cell(figures, key) for figures in columns.values())] for key in keys]
    return ["**CPU-seconds per pipeline run**, by where they were spent.", ""] + table(["where", *columns], rows)


def cached(results: dict[str, Any]) -> list[str]:
    ca = results["cached"]
    rows = [[key, fmt(value)] for key, value in ca.items()]
    if uncached := results.get("latency", {}).get("docker", {}).get("trigger to completed"):
        rows.append(["uncached: trigger to completed", fmt(uncached)])
    if main_floor := results.get("floor", {}).get("main_flow", {}).get("start+imports"):
        rows.append(["main flow floor (a container plus its imports)", fmt(main_floor)])
        rows.append(["cached above the floor", f"{ca['trigger to completed']['median'] - main_floor['median']:.2f}"])
    return ["**A fully cached run** (s): only the main flow's container starts.", ""] + table(
        ["figure", "docker"], rows
    )


def polling(results: dict[str, Any]) -> list[str]:
    rows = []
    for interval, figures in sorted(results["polling"].items(), key=lambda item: float(item[0])):
        seconds = figures.get("docker") or results.get("latency", {}).get("docker", {}).get("trigger to completed")
        rows.append([interval, fmt(seconds) if seconds else "-", f"{figures['idle']['prefect-server']:.3f}"])
    return ["**The worker query interval**: latency, and the idle server's CPU-seconds per second.", ""] + table(
        ["interval (s)", "trigger to completed (s)", "idle server CPU (s/s)"], rows
    )


def sizes(results: dict[str, Any]) -> list[str]:
    rows = []
    for store, by_rows in results["sizes"].items():
        for n, samples in by_rows.items():
            done = [s for s in samples if s["seconds"] is not None]
            seconds = fmt(spread([s["seconds"] for s in done]), 1) if done else "failed"
            peak = ", ".join(f"{max(s['peak_mb'][c] for s in done):.0f}" for c in COMPONENTS) if done else "-"
            mb = f"{done[0]['csv_mb']:.1f}, {done[0]['parquet_mb']:.1f}" if done else "-"
            ok = f"{sum(s['correct'] for s in samples)}/{len(samples)}"
            rows.append([f"{int(n):,}", store, mb, seconds, peak, ok])
    return ["**Input size**: random Iris-like rows over HTTP.", ""] + table(
        ["rows", "store", "CSV, Parquet (MB)", "trigger to completed (s)", "peak MB: main, validate, subflow", "ok"],
        rows,
    )


def formats(results: dict[str, Any]) -> list[str]:
    rows = []
    for n, by_form in results["formats"].items():
        baseline = by_form["csv"]["seconds"]["median"]
        for form, f in by_form.items():
            peak = f"{f['main_peak_mb']:.0f}" if f["main_peak_mb"] else "-"
            ratio = f["seconds"]["median"] / baseline
            rows.append([f"{int(n):,}", form, f"{f['source_mb']:.1f}", fmt(f["seconds"], 1), f"{ratio:.2f}x", peak,
                         f"{f['correct']}/{f['runs']}"])  # fmt: skip
    return [
        "**Source formats**: the ingest alone of the same rows as CSV, gzip CSV and Parquet, forms alternating.",
        "",
    ] + table(
        ["rows", "source", "source MB", "ingest: trigger to completed (s)", "vs CSV", "main flow peak MB", "ok"], rows
    )


def mapped(results: dict[str, Any]) -> list[str]:
    by_rows, rows = results["mapped"], []
    for n in sorted(by_rows, key=int, reverse=True):  # the smallest last: what partitions cost
        for p, figures in by_rows[n].items():
            one = by_rows[n].get("1", {}).get("seconds", {}).get("median")
            speedup = f"{one / figures['seconds']['median']:.2f}x" if one else "-"
            start, work = figures["scheduled to running"]["median"], figures["running to completed"]["median"]
            rows.append([f"{int(n):,}", p, fmt(figures["seconds"]), speedup, f"{start:.2f}, {work:.2f}"])
    return ["**Fan-out**: validate mapped over partitions, then subflow.", ""] + table(
        ["rows", "partitions", "validate wall (s)", "speedup", "slowest partition: to running, running (s)"], rows
    )


def diamond(results: dict[str, Any]) -> list[str]:
    figures = results["diamond"]
    ratio = figures["diamond"]["median"] / figures["longest path"]["median"]
    rows = [[figure, fmt(seconds, 1)] for figure, seconds in figures.items()]
    intro = (f"**A graph**: the `enriched` diamond against its steps in sequence (s); the diamond takes "
             f"{ratio:.2f}x its longest path (target: at most 1.15x).")  # fmt: skip
    return [intro, ""] + table(["run", "trigger to completed"], rows)


def throughput(results: dict[str, Any]) -> list[str]:
    rows = []
    for n, by in results["throughput"].items():
        cells = [f"{x['wall']:.1f}, {x['correct']}/{n}, {x['503s']}" for x in by.values()]
        ratio = f"{by['docker']['wall'] / by['process']['wall']:.2f}" if "process" in by else ""
        rows.append([n, *cells, ratio])
    designs = list(next(iter(results["throughput"].values())))
    return ["**Throughput**: N pipeline runs created at once.", ""] + table(
        ["runs at once", *(f"{d}: wall (s), correct, 503s" for d in designs), "docker/process"], rows
    )


def redeploy(results: dict[str, Any]) -> list[str]:
    return [f"**Redeploying** the subflow after a one-line change: {fmt(results['redeploy'], 1)} s."]


def authority(results: dict[str, Any]) -> list[str]:
    figures = results["authority"]
    ways = list(figures["read its run"])
    calls = [c for c in figures if not c.startswith("10 at once")]
    rows = [[f"{call} (ms)", *(fmt(figures[call][way], 1) for way in ways)] for call in calls]
    rows.append(["10 at once (calls/s)", *(f"{figures['10 at once, calls/s'][way]:.0f}" for way in ways)])
    intro = "**Per-run authority**: a flow container's API calls checked against its run, and with a shared credential."
    return [intro, ""] + table(["call", *ways], rows)


def cancel(results: dict[str, Any]) -> list[str]:
    rows = [[figure, fmt(samples, 1)] for figure, samples in results["cancel"].items()]
    return ["**Stopping a pipeline** (s), validate running in partitions.", ""] + table(["from", "seconds"], rows)


TABLES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "floor": floor,
    "latency": latency,
    "cpu": cpu,
    "cached": cached,
    "polling": polling,
    "sizes": sizes,
    "formats": formats,
    "mapped": mapped,
    "diamond": diamond,
    "throughput": throughput,
    "redeploy": redeploy,
    "authority": authority,
    "cancel": cancel,
}
NEEDS = {"cpu": "latency"}  # a table drawn from another stage's results


def report(results: dict[str, Any]) -> str:
    """Every table the results have the figures for."""
    parts = [TABLES[name](results) for name in TABLES if NEEDS.get(name, name) in results]
    return "\n\n".join([measured(results)] + ["\n".join(lines) for lines in parts]) + "\n"


def measured(results: dict[str, Any]) -> str:
    return f"Measured {results['when'][:16].replace('T', ' ')} UTC ({results['plan']})."


def summary(results: dict[str, Any]) -> str:
    """README's few lines: each part's headline figure, from the run the tables come from."""
    lat, floor_s = results["latency"], results["floor"]["pipeline"]
    run, cached = lat["docker"]["trigger to completed"]["median"], results["cached"]["trigger to completed"]["median"]
    process = lat.get("process", {}).get("trigger to completed")
    baseline = f"; on process workers {process['median']:.1f} s" if process else ""
    by_rows = results["sizes"]["file"]
    biggest = max(by_rows, key=int)
    done = [s for s in by_rows[biggest] if s["seconds"] is not None]
    size = (
        f"{statistics.median(s['seconds'] for s in done):.1f} s, each container's peak memory at most "
        f"{max(max(s['peak_mb'].values()) for s in done):.0f} MB (the limit is 1 GB)"
        if done
        else "failed"
    )
    most = max(results["throughput"], key=int)
    at_once, stopped = results["throughput"][most]["docker"], results["cancel"]
    lines = [
        f"- one pipeline run, trigger to completed: {run:.1f} s, {run / floor_s:.2f}x the floor of three fresh "
        f"containers with their imports ({floor_s:.1f} s){baseline};",
        f"- a fully cached run: {cached:.1f} s (only its main flow starts);",
        f"- {int(biggest):,} rows: {size};",
        f"- {most} runs at once: {at_once['wall']:.0f} s, {at_once['correct']}/{most} correct;",
        f"- a cancel to every container gone: {stopped[CANCELLED]['median']:.1f} s; a killed main flow's container to "
        f"every step stopped: {stopped[KILLED]['median']:.1f} s.",
    ]
    return measured(results) + "\n\n" + "\n".join(lines) + "\n"


def write_into(readme: Path, text: str, slot: tuple[str, str]) -> None:
    """Replace what is between README's markers `slot` with `text`."""
    start, end = slot
    old = readme.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(old):
        raise ValueError(f"{readme} has no {start} ... {end} section")
    readme.write_text(pattern.sub(lambda _: f"{start}\n\n{text}\n{end}", old))
