"""`make bench`: every stage of the benchmark on a stack of its own, one results file, its charts,
and bench/README.md's tables and README.md's summary generated from them.

    .venv/bin/python -m bench                              # make bench: every stage (about an hour here)
    .venv/bin/python -m bench --stages latency cached      # some stages
    .venv/bin/python -m bench --smoke                      # each stage once, at its smallest size
    .venv/bin/python -m bench --stages latency --before <git ref>   # the main flow then and now
    .venv/bin/python -m bench --report bench/results.json  # no run: that file's tables and summary into the READMEs
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import charts, report
from bench.stack import Bench
from bench.stages import STAGES, Plan, runs_baseline

HERE = Path(__file__).resolve().parent
TABLES, SUMMARY = HERE / "README.md", HERE.parent / "README.md"


def run(bench: Bench, plan: Plan, stages: list[str], out: Path, chart_dir: Path) -> dict[str, Any]:
    """Run `stages` on `bench`, one after another (or in the plan's lanes, one after another in
    each, the lanes at once); write every sample to `out` as each stage ends (what is done survives
    a failure), then the charts into `chart_dir`."""
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(),
        "plan": "smoke" if plan == Plan.smoke() else "full" if plan == Plan() else "custom",
        "args": {**dataclasses.asdict(plan), "stages": stages, "designs": bench.designs},
        "seconds": {},
    }
    written = threading.Lock()

    def lane(names: list[str]) -> None:
        for name in names:
            print(f"[bench] {name} ...", flush=True)
            started = time.monotonic()
            with bench.baseline() if runs_baseline(name, plan) else contextlib.nullcontext():
                figures = STAGES[name](bench, plan)
            with written:
                results[name], results["seconds"][name] = figures, round(time.monotonic() - started, 1)
                out.write_text(json.dumps(results, indent=2, default=str))
            print(f"[bench] {name}: {results['seconds'][name]:.0f} s", flush=True)

    lanes = [[name for name in names if name in stages] for names in plan.lanes] if plan.lanes else [stages]
    if sorted(name for names in lanes for name in names) != sorted(stages):
        raise ValueError(f"the plan's lanes {plan.lanes} must hold each of {stages} once")
    with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
        for done in [pool.submit(lane, names) for names in lanes]:
            done.result()  # a stage's failure, raised here
    results["seconds"] = {name: results["seconds"][name] for name in stages}
    results["charts"] = [path.name for path in charts.draw(results, chart_dir)]
    out.write_text(json.dumps(results, indent=2, default=str))
    return results


def publish(results: dict[str, Any]) -> None:
    """One run's figures into the READMEs: every table into bench/README.md, the summary into README.md."""
    report.write_into(TABLES, report.report(results), report.TABLES_SLOT)
    report.write_into(SUMMARY, report.summary(results), report.SUMMARY_SLOT)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stages", nargs="*", default=list(STAGES), choices=list(STAGES), help="the figures to measure"
    )
    parser.add_argument("--smoke", action="store_true", help="each stage once, at its smallest size")
    parser.add_argument("--before", metavar="REF", help="also time the main flow as of this git ref")
    parser.add_argument("--out", type=Path, help="the results file (default: bench/results.json, or "
                        "bench/partial/results.json for a run of some stages or the smoke)")  # fmt: skip
    parser.add_argument("--charts", type=Path, help="where the charts go (default: beside the results)")
    parser.add_argument("--keep", action="store_true", help="leave the benchmark's stack up afterwards")
    parser.add_argument("--report", type=Path, metavar="RESULTS", help="write RESULTS' figures into the READMEs")
    args = parser.parse_args()
    if args.report:
        publish(json.loads(args.report.read_text()))
        print(f"{TABLES} and {SUMMARY}: figures from {args.report}")
        return
    plan = Plan.smoke() if args.smoke else Plan()
    full = plan == Plan() and args.stages == list(STAGES)  # only a full run replaces the committed figures
    out = args.out or (HERE if full else HERE / "partial") / "results.json"
    chart_dir = args.charts or out.parent
    for directory in (out.parent, chart_dir):
        directory.mkdir(parents=True, exist_ok=True)
    bench = Bench.own()
    bench.up()
    try:
        if args.before:
            bench.before(args.before)
        results = run(bench, plan, args.stages, out, chart_dir)
    finally:
        if not args.keep:
            bench.stack.down()
    print(report.report(results))
    if full and out == HERE / "results.json":
        publish(results)  # a full run is the one the READMEs show
        print(f"{TABLES} and {SUMMARY}: figures updated")
    print(f"results: {out}; charts: {', '.join(results['charts'])} in {chart_dir}")


if __name__ == "__main__":
    main()
