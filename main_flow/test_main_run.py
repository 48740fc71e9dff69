"""The main flow itself, in this process, against a real Prefect API and a file store, no Docker:
what it refuses before it starts any step."""

import pyarrow as pa
import pytest

from main_flow.main_flow import main_flow
from stepkit import write_parquet


@pytest.fixture
def stored(run_dir):
    """An input a past run stored: what a replay passes as `data`."""
    return write_parquet(pa.table({"a": [1, 2, 3]}), f"file://{run_dir}/input/part-00000.parquet")


def test_a_replay_whose_stored_input_changed_fails_before_any_step(prefect_api, stored):
    state = main_flow(data={**stored, "sha256": "0" * 64}, steps=["validate/validate"], return_state=True)
    assert state.is_failed()
    assert f"stored object corrupt: {stored['uri']} does not match its sha256" in state.message


def test_a_step_whose_deployment_is_missing_fails_at_once_naming_the_deploy_command(prefect_api, stored):
    # A name no other test deploys on the shared test server; a short timeout, should one ever.
    state = main_flow(data=stored, steps=["never/deployed"], step_timeout_s=30, return_state=True)
    assert state.is_failed()
    assert "deployment 'never/deployed' not found: register it with `prefect deploy --name deployed`" in state.message
