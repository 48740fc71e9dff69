"""The most a run may ask of the main flow, from .env (through the work pool's template, and the
cli service that deploys it): its parameters' maxima in the deployment's schema, so that a call
over one is refused when the run is created, naming the parameter."""

from pydantic_settings import BaseSettings


class Bounds(BaseSettings):
    """The operator's bounds; every one is required: .env is their one home."""

    max_source_bytes: int  # max_bytes
    max_source_columns: int  # max_columns
    max_input_parts: int  # how many Parquet parts an input may have, whatever part_rows asks
    max_timeout_seconds: int  # fetch_timeout_s and step_timeout_s
    max_partitions_at_once: int  # partitions_at_once


BOUNDS = Bounds()
