"""The pipeline as a graph (stepkit/graph.py): the list form as its simple case, the graph form,
and every refusal, one per cause, with its message. No Docker, no server: the graph is checked
before anything runs or is built."""

import pytest

from stepkit import Contract
from stepkit.graph import INGEST, GraphError, check, dependents, graph_of, order

DIAMOND = [
    "validate/validate",
    {"step": "subflow/subflow", "needs": ["validate"]},
    {"step": "stats/stats", "needs": ["validate/validate"]},
    {"step": "join/join", "needs": {"left": "subflow", "right": "stats"}},
]
IRIS = {"sepal_length": "double", "species": "string"}
COUNTS, MEANS = {"species": "string", "count": "int64"}, {"species": "string", "mean": "double"}
CONTRACTS = {
    "validate/validate": Contract(requires={"data": IRIS}, produces=IRIS),
    "subflow/subflow": Contract(requires={"data": {"species": "string"}}, produces=COUNTS),
    "stats/stats": Contract(produces=MEANS),
    "join/join": Contract(inputs=("left", "right"), requires={"left": {"count": "int64"}, "right": {"mean": "double"}}),
}


def needs(steps) -> dict[str, dict[str, str]]:
    return {name: node.needs for name, node in graph_of(steps).items()}


def test_the_list_form_is_a_chain_and_a_list_inside_runs_at_once_on_the_same_input():
    assert needs(["a/a", ["b/b", "c/c"], "d/d"]) == {
        "a/a": {"data": INGEST},
        "b/b": {"data": "a/a"},
        "c/c": {"data": "a/a"},
        "d/d": {"data": "b/b"},  # after a group, its first step's output: as before graphs
    }


def test_the_graph_form_names_each_input_and_orders_every_step_after_what_it_needs():
    graph = graph_of(DIAMOND)
    assert needs(DIAMOND) == {
        "validate/validate": {"data": INGEST},
        "subflow/subflow": {"data": "validate/validate"},
        "stats/stats": {"data": "validate/validate"},
        "join/join": {"left": "subflow/subflow", "right": "stats/stats"},
    }
    ordered = order(graph)
    assert ordered[0] == "validate/validate" and ordered[-1] == "join/join"
    assert needs(["a/a", "b/b", {"step": "j/j", "needs": ["a", "b/b"]}])["j/j"] == {"a": "a/a", "b": "b/b"}
    # Without needs, a step reads the one before it, as in the list form; needs: [] the ingest's output.
    assert needs(["a/a", {"step": "b/b", "needs": []}, "c/c"]) == {
        "a/a": {"data": INGEST}, "b/b": {"data": INGEST}, "c/c": {"data": "b/b"}
    }  # fmt: skip
    assert dependents(graph, "subflow/subflow") == ["join/join"]  # stats, its own branch, goes on
    assert dependents(graph, "validate/validate") == ["subflow/subflow", "stats/stats", "join/join"]
    check(graph, CONTRACTS, source=IRIS)  # every edge gives what its consumer requires


@pytest.mark.parametrize(
    ("steps", "contracts", "message"),
    [
        (["a/a", ["b/b", "a/a"]], {}, r"steps \['a/a'\] are listed twice"),
        (["a/a", []], {}, "an empty list of steps"),
        ([{"step": "b/b", "needs": ["nope"]}], {}, r"step b/b needs 'nope', but there is no step 'nope'"),
        (["a/x", "a/y", {"step": "b/b", "needs": ["a"]}], {}, r"'a' is 2 steps: \['a/x', 'a/y'\]"),
        (
            [{"step": "a/a", "needs": ["c"]}, {"step": "b/b", "needs": ["a"]}, {"step": "c/c", "needs": ["b"]}],
            {},
            r"the steps (\w/\w -> ){3}\w/\w form a cycle",
        ),
        ([{"step": "a/a", "needs": ["a"]}], {}, "the steps a/a -> a/a form a cycle"),
        (
            ["a/a", "b/b", {"step": "j/j", "needs": ["a", "b"], "partitions": 2}],
            {},
            r"steps \['j/j'\] have several inputs: only a step of one input can be mapped",
        ),
        (
            [*DIAMOND[:3], {"step": "join/join", "needs": {"left": "subflow", "rigth": "stats"}}],
            CONTRACTS,
            r"step join/join takes the inputs \['left', 'right'\], not \['left', 'rigth'\]",
        ),
        (
            [*DIAMOND[:3], {"step": "join/join", "needs": {"left": "stats", "right": "subflow"}}],
            CONTRACTS,
            r"edge stats/stats -> join/join \(input left\): join/join requires column 'count' \(int64\), which "
            r"stats/stats does not produce \(it gives \['mean', 'species'\]\)",
        ),
        (
            DIAMOND,
            {**CONTRACTS, "stats/stats": Contract(produces={"mean": "string"})},
            r"edge stats/stats -> join/join \(input right\): join/join requires column 'mean' as double, "
            r"stats/stats produces it as string",
        ),
    ],
)
def test_a_graph_that_cannot_run_is_refused_naming_why(steps, contracts, message):
    with pytest.raises(GraphError, match=message):
        check(graph_of(steps), contracts, source=IRIS)


def test_the_source_s_columns_are_checked_where_declared_and_an_undeclared_output_is_left_to_the_kit():
    graph = graph_of(DIAMOND)
    with pytest.raises(GraphError, match=r"edge ingest -> validate/validate: .* column 'species' \(string\)"):
        check(graph, CONTRACTS, source={"sepal_length": "double"})
    check(graph, CONTRACTS, source=None)  # the source's columns unknown when deployed
    undeclared = {**CONTRACTS, "stats/stats": Contract()}
    check(graph, undeclared, source=IRIS)  # stats says nothing of its output: checked where it runs
