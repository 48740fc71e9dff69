"""What travels between components: a reference to a stored object, and a step's result."""

from dataclasses import dataclass, field
from typing import Annotated, Any, NotRequired

from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic needs it for parameters on Python 3.11

# The wire format of DataRef and StepResult. Bump it only for a change that a component built
# with the previous kit cannot read; every component must then be redeployed (README).
WIRE = 3  # 2: a DataRef can be a dataset of parts; 3: a step's result is its out/result.json

# A step is its deployment's full name, `flow/deployment`: what run_deployment() takes. A
# pipeline is a list of steps run one after another, a list inside at once; or a graph, each step
# naming the steps it `needs` (stepkit/graph.py).
StepName = Annotated[str, Field(pattern=r"^[\w.-]+/[\w.-]+$")]
DATA = "data"  # a step's input when it takes one; a step of several names them
Columns = dict[str, str]  # column -> its Arrow type, as pyarrow writes it (double, int64, string, ...)


@with_config(ConfigDict(extra="forbid"))  # a misspelt option is an error, not a silent default
class StepOptions(TypedDict):
    """A step with options, e.g. `{step: subflow/subflow, cache: false}`."""

    step: StepName
    cache: NotRequired[bool]  # reuse an earlier run's result when the step's key is unchanged (default true)
    # Map the step over its input: one child run per partition, a group of the input's parts.
    partitions: NotRequired[Annotated[int, Field(ge=1)]]
    rows_per_partition: NotRequired[Annotated[int, Field(ge=1)]]
    # Start the step again after it Crashed (its container died or never reached the API), never
    # after it Failed (bad data, a bug): at most this many times (default 2).
    retries: NotRequired[Annotated[int, Field(ge=0, le=10)]]
    # The steps whose outputs it reads (a step's full name or its flow's name): one, as `data`, or
    # several, named after their steps or by a mapping, e.g. {left: subflow, right: stats}.
    needs: NotRequired[list[str] | dict[Annotated[str, Field(pattern=r"^\w+$")], str]]


Step = StepName | StepOptions
Steps = list[Step | list[Step]]
# The Prefect Variables that hold each pipeline's steps as last deployed (tools/deploy/steps.py),
# named after the pipeline: its main-flow deployment's name.
PIPELINE_STEPS = "pipeline-steps"
PIPELINE_NAME = r"^[a-z0-9][a-z0-9_-]*$"  # as Prefect names Variables


def steps_variable(pipeline: str) -> str:
    """The Variable that holds `pipeline`'s steps, e.g. pipeline-steps-main."""
    return f"{PIPELINE_STEPS}-{pipeline}"


@dataclass(frozen=True)
class Contract:
    """What a step takes and gives: its inputs' names, the columns each requires, and the columns
    of its output (None: not declared, so checked only where it runs)."""

    inputs: tuple[str, ...] = (DATA,)
    requires: dict[str, Columns] = field(default_factory=dict)
    produces: Columns | None = None

    @classmethod
    def of(
        cls, inputs: list[str], requires: Columns | dict[str, Columns] | None, produces: Columns | None
    ) -> "Contract":
        """A contract as `@step` declares it: `requires` by input, or its columns alone for a step of one input."""
        alone = requires is not None and all(isinstance(kind, str) for kind in requires.values())
        by_input: dict[str, Columns] = {inputs[0]: requires} if alone else dict(requires or {})  # type: ignore[dict-item]
        if unknown := sorted(set(by_input) - set(inputs)):
            raise TypeError(f"requires names {unknown}, which are not among the step's inputs {inputs}")
        return cls(tuple(inputs), by_input, produces)


class Part(TypedDict):
    """One Parquet file of a dataset of parts."""

    uri: str
    rows: int
    bytes: int
    sha256: str


class DataRef(TypedDict):
    """A dataset in the data store, and what it holds: one Parquet object (`uri`), or with `parts`,
    Parquet files read in order as one dataset; `uri` is then the directory they share and
    `sha256` the hash of the parts' sha256s (stepkit.store.dataset_of)."""

    wire: int
    uri: str
    rows: int
    columns: list[str]
    bytes: int
    sha256: str
    parts: NotRequired[list[Part]]


class StepResult(TypedDict):
    """What every step returns to the main flow (a step may add keys of its own)."""

    output: DataRef
    summary: list[dict[str, Any]]
    report: str
    image: str
    peak_rss_bytes: int
    cpu_seconds: float


# The keys the main flow reads from every step's result, and their JSON types.
STEP_RESULT: dict[str, type] = {"output": dict, "summary": list, "report": str, "image": str}


class WireMismatch(ValueError):
    """A reference written with another wire format than this kit reads."""


def check_wire(ref: dict[str, Any], reader: str = "this component") -> None:
    """Refuse a reference of another wire format, naming both versions and what to redeploy."""
    from stepkit import __version__

    got, uri = (ref.get("wire", 0), ref.get("uri")) if isinstance(ref, dict) else (0, ref)
    if got == WIRE:
        return
    fix = "redeploy the component that wrote it" if got < WIRE else f"redeploy {reader}"
    raise WireMismatch(
        f"reference {uri} has wire format {got}, but {reader} (stepkit {__version__}) reads wire format "
        f"{WIRE}: {fix} with the current stepkit"
    )
