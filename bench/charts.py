"""The benchmark's charts, from its results: one PNG per figure that reads better drawn."""

import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.stages import COMPONENTS  # noqa: E402


def sizes(results: dict[str, Any], path: Path) -> None:
    """Time and peak memory against rows, per store."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for store, by_rows in results["sizes"].items():
        done = {int(n): [x for x in samples if x["seconds"]] for n, samples in by_rows.items()}
        rows = [n for n, d in done.items() if d]
        kept = [done[n] for n in rows]
        left.plot(rows, [statistics.median(x["seconds"] for x in d) for d in kept], marker="o", label=f"{store} store")
        for component in COMPONENTS:
            peaks = [max(x["peak_mb"][component] for x in d) for d in kept]
            right.plot(rows, peaks, marker="o", label=f"{component} ({store})")
    left.set(xscale="log", yscale="log", xlabel="rows", ylabel="trigger to completed (s)", title="Pipeline time")
    right.set(xscale="log", xlabel="rows", ylabel="peak RSS (MB)", title="Peak memory per flow container")
    right.axhline(1024, color="grey", linestyle="--", linewidth=1, label="1 GB")
    save(figure, [left, right], path)


def mapped(results: dict[str, Any], path: Path) -> None:
    """Speedup and wall time of the mapped step against partitions."""
    by_rows = results["mapped"]
    partitions = [int(p) for p in next(iter(by_rows.values()))]
    seconds = {n: [by_rows[n][str(p)]["seconds"]["median"] for p in partitions] for n in sorted(by_rows, key=int)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, times in seconds.items():
        left.plot(partitions, [times[0] / t for t in times], marker="o", label=f"{int(n):,} rows")
        right.plot(partitions, times, marker="o", label=f"{int(n):,} rows")
    cores = os.cpu_count() or 1
    ideal = [min(p, cores) for p in partitions]
    left.plot(partitions, ideal, color="grey", linestyle="--", linewidth=1, label=f"ideal on {cores} cores")
    left.set(xlabel="partitions", ylabel="speedup of the mapped step", title="Speedup (one CPU per container)")
    right.set(xlabel="partitions", ylabel="validate wall time (s)", title="Mapped step wall time", ylim=(0, None))
    for axis in (left, right):
        axis.set_xticks(partitions)
    save(figure, [left, right], path)


TARGET_S = 15  # seconds a pipeline should take to stop, at the most


def cancel(results: dict[str, Any], path: Path) -> None:
    """Seconds from a cancel, and from a main container killed, to a pipeline stopped: each run."""
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    figures = results["cancel"]
    samples = [figure_samples["samples"] for figure_samples in figures.values()]
    axis.boxplot(samples, tick_labels=list(figures), orientation="horizontal")
    longest = max(max(xs) for xs in samples)
    axis.set(xlabel="seconds to every run final and every container gone", title="Stopping a pipeline",
             xlim=(0, max(TARGET_S, longest) * 1.05))  # fmt: skip
    axis.axvline(TARGET_S, color="grey", linestyle="--", linewidth=1, label=f"the {TARGET_S} s target")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save(figure: Any, axes: list[Any], path: Path) -> None:
    for axis in axes:
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


CHARTS: dict[str, Callable[[dict[str, Any], Path], None]] = {"sizes": sizes, "mapped": mapped, "cancel": cancel}


def draw(results: dict[str, Any], directory: Path) -> list[Path]:
    """A chart per figure the results have: `<stage>.png` in `directory`."""
    drawn = []
    for stage, chart in CHARTS.items():
        if stage in results:
            chart(results, path := directory / f"{stage}.png")
            drawn.append(path)
    return drawn
