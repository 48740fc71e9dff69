"""stepkit: the contract every pipeline component is built with, in one versioned package.

It owns the references that travel between components (`DataRef`, one Parquet object or a
dataset of parts, with the wire format's version), the step result, the run layout in the data
store, atomic hashed writes, reads that check the sha256 while they read, and the `@step`
decorator that turns a function of (input dataset, own parameters) into a Prefect flow with the
contract's signature. component.Dockerfile copies it into every component image, so each image
keeps the kit it was built with.
"""

from stepkit.contract import (
    DATA,
    PIPELINE_STEPS,
    STEP_RESULT,
    WIRE,
    Columns,
    Contract,
    DataRef,
    Part,
    Step,
    StepName,
    StepOptions,
    StepResult,
    Steps,
    WireMismatch,
    check_wire,
    steps_variable,
)  # fmt: skip
from stepkit.layout import RefusedReference, RunLayout, redact
from stepkit.step import Dataset, Out, Output, StepFailed, batches, component_image, result_uri, step, usage
from stepkit.store import atomic_write, dataset_of, parts_of, verify, write_parquet

__version__ = "3.1.0"  # see README, "The step kit": which changes need every component redeployed

__all__ = [
    "DATA", "PIPELINE_STEPS", "STEP_RESULT", "WIRE", "Columns", "Contract", "DataRef", "Dataset", "Out", "Output",
    "Part", "RefusedReference", "RunLayout", "StepFailed", "Step", "StepName", "StepOptions", "StepResult", "Steps",
    "WireMismatch",
    "atomic_write", "check_wire", "batches", "component_image", "dataset_of", "parts_of", "redact", "result_uri",
    "step", "steps_variable", "usage", "verify", "write_parquet",
]  # fmt: skip
