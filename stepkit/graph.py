"""The pipeline as a graph: each step reads the outputs of the steps it `needs` and starts once
they have completed. The list form of prefect.yaml is the simple case: one step after another,
a list inside at once. Checked whole before anything runs: no step twice, no unknown step, no
cycle, each input one the step takes and each column it requires one its producer gives.

    - validate/validate                                   # the first: reads the ingest's output
    - {step: subflow/subflow, needs: [validate]}          # one input, `data`
    - {step: stats/stats, needs: [validate]}              # beside subflow: both need only validate
    - {step: join/join, needs: {left: subflow, right: stats}}   # named inputs
    - {step: audit/audit, needs: []}                      # the ingest's output, beside them all
"""

from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter

from stepkit import DATA, Columns, Contract, Step, StepOptions, Steps

INGEST = "ingest"  # the main flow's own step, which every graph starts from


@dataclass(frozen=True)
class Node:
    """One step of the graph: where each of its inputs comes from, and its options."""

    step: str
    needs: dict[str, str]  # input name -> the step whose output it reads, or INGEST
    options: StepOptions


class GraphError(ValueError):
    """A pipeline that cannot run as declared."""


Graph = dict[str, Node]


def graph_of(steps: Steps) -> Graph:
    """The steps as a graph, in the order given. A step reads what it `needs` (`[]`: the
    ingest's output); without `needs`, as in the list form, the output of the step before it
    (after a list, of its first step)."""
    flat = [s for entry in steps for s in (entry if isinstance(entry, list) else [entry])]
    names = [name_of(s) for s in flat]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise GraphError(f"steps {repeated} are listed twice: each step once")
    if any(isinstance(entry, list) and not entry for entry in steps):
        raise GraphError("an empty list of steps: a list inside runs its steps at once, so it needs some")
    options = {name_of(s): s if isinstance(s, dict) else StepOptions(step=s) for s in flat}
    if both := sorted(n for n, o in options.items() if "partitions" in o and "rows_per_partition" in o):
        raise GraphError(f"steps {both}: give partitions or rows_per_partition, not both")
    groups = [[name_of(s) for s in (entry if isinstance(entry, list) else [entry])] for entry in steps]
    before = [INGEST] + [group[0] for group in groups]
    graph = {
        name: Node(name, needed(name, options[name]["needs"], names) if "needs" in options[name] else {DATA: before[i]},
                   options[name])
        for i, group in enumerate(groups)
        for name in group
    }  # fmt: skip
    mapped = {"partitions", "rows_per_partition"}
    if several := sorted(n for n, node in graph.items() if len(node.needs) > 1 and mapped & node.options.keys()):
        raise GraphError(f"steps {several} have several inputs: only a step of one input can be mapped")
    return graph


def needed(step: str, needs: list[str] | dict[str, str], names: list[str]) -> dict[str, str]:
    """`needs` as input name -> step: one unnamed input is `data`, several are named after their steps."""
    if isinstance(needs, list):
        named = {DATA: needs[0]} if len(needs) == 1 else {need.split("/")[0]: need for need in needs}
        if len(named) < len(needs):
            raise GraphError(f"step {step} needs {needs}: name its inputs, e.g. needs: {{left: a, right: b}}")
    else:
        named = dict(needs)
    return {name: resolve(step, need, names) for name, need in named.items()} or {DATA: INGEST}


def resolve(step: str, need: str, names: list[str]) -> str:
    """The step that `need` names: its full name, its flow's name alone, or the ingest."""
    if need == INGEST or need in names:
        return need
    found = [name for name in names if name.split("/")[0] == need]
    if len(found) != 1:
        why = f"{need!r} is {len(found)} steps: {found}" if found else f"there is no step {need!r}"
        raise GraphError(f"step {step} needs {need!r}, but {why} (the pipeline's steps: {names})")
    return found[0]


def order(graph: Graph) -> list[str]:
    """The steps, each after every step it needs; refuse a cycle, naming it."""
    try:
        needs = {name: set(node.needs.values()) - {INGEST} for name, node in graph.items()}
        return list(TopologicalSorter(needs).static_order())
    except CycleError as exc:
        raise GraphError(f"the steps {' -> '.join(exc.args[1])} form a cycle") from None


def check(graph: Graph, contracts: dict[str, Contract], source: Columns | None = None) -> None:
    """Refuse a graph whose steps take other inputs than they are given, or whose edge lacks a
    column its consumer requires: every such problem at once, each naming the edge, the column and
    both steps. `contracts` by step (a step without one is unchecked); `source`, the ingest's columns."""
    order(graph)
    problems = []
    for name, node in graph.items():
        contract = contracts.get(name)
        if contract is None:
            continue
        if sorted(node.needs) != sorted(contract.inputs):
            problems.append(f"step {name} takes the inputs {sorted(contract.inputs)}, not {sorted(node.needs)}")
            continue
        for input_name, producer in node.needs.items():
            given = source if producer == INGEST else getattr(contracts.get(producer), "produces", None)
            if given is None:  # undeclared: the kit checks it where the step runs
                continue
            edge = f"{producer} -> {name}" + (f" (input {input_name})" if input_name != DATA else "")
            for column, kind in contract.requires.get(input_name, {}).items():
                if column not in given:
                    problems.append(f"edge {edge}: {name} requires column {column!r} ({kind}), which {producer} "
                                    f"does not produce (it gives {sorted(given)})")  # fmt: skip
                elif given[column] != kind:
                    problems.append(f"edge {edge}: {name} requires column {column!r} as {kind}, {producer} "
                                    f"produces it as {given[column]}")  # fmt: skip
    if problems:
        raise GraphError("; ".join(problems))


def name_of(step: Step) -> str:
    return step["step"] if isinstance(step, dict) else step


def uncached(graph: Graph) -> frozenset[str]:
    """The steps declared with `cache: false`."""
    return frozenset(name for name, node in graph.items() if node.options.get("cache") is False)


def dependents(graph: Graph, failed: str) -> list[str]:
    """Every step that reads, directly or not, the output of `failed`: what its failure stops."""
    stopped, changed = {failed}, True
    while changed:
        more = {n for n, node in graph.items() if n not in stopped and stopped & set(node.needs.values())}
        stopped, changed = stopped | more, bool(more)
    return [n for n in graph if n in stopped and n != failed]
