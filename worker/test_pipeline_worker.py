"""The workers' container policy (pipeline_worker/policy.py) against the repository's pools/, and how they
put a container's end into words (pipeline_worker/exits.py)."""

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pipeline_worker import Policy, PolicyViolation, credential, memory_bytes, mounts
from pipeline_worker.authority import run_of
from pipeline_worker.exits import TAIL_BYTES, TAIL_LINES, Exit, tail_of
from pipeline_worker.worker import CANCEL, MAIN, STEP, STOP, Role, left_cancelling, reaping, wakes
from prefect.client.schemas.objects import FlowRun
from prefect.events import Event
from prefect.states import Cancelled, Cancelling, Completed, Crashed, Failed, Pending, Running, State

POOLS = Path(__file__).resolve().parent.parent / "pools"
ENV = {
    "PIPELINE_DATA_URL": "file:///store", "AWS_ENDPOINT_URL": "", "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
    "AWS_DEFAULT_REGION": "", "SOURCE_ALLOW": "", "FLOW_UID": "10001", "REGISTRY": "registry.example:5000",
    "STACK_NETWORK": "stack_default", "DATA_VOLUME": "stack_data", "FLOW_API_URL": "http://gateway:4201/api",
    "FLOW_RUN_KEY": "k" * 64, "PREFECT_CLIENT_MAX_RETRIES": "6", "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
    "FLOW_HEARTBEAT_SECONDS": "30", "FLOW_ROLES": "main-flow:main,retention:maintenance",
    "MAX_SOURCE_BYTES": "1", "MAX_SOURCE_COLUMNS": "1", "MAX_INPUT_PARTS": "1",
    "MAX_TIMEOUT_SECONDS": "1", "MAX_PARTITIONS_AT_ONCE": "1",
}  # fmt: skip


RUN = "0b6e8d7e-3a1f-4c2b-9d5e-7f8a9b0c1d2e"
BINDS = [f"/var/lib/docker/volumes/stack_data/_data/runs/{RUN}/validate:/store/runs/{RUN}/validate:rw"]


@pytest.fixture
def policy() -> Policy:
    return Policy(POOLS, ENV)


def settings(**changes: object) -> dict:
    """Container settings as prefect-docker builds them from the repository's template."""
    base = {
        "image": "registry.example:5000/subflow@sha256:" + "0" * 64, "network": "stack_default", "network_mode": None,
        "command": "python -m prefect.engine", "environment": {}, "auto_remove": False, "labels": {},
        "extra_hosts": None, "name": f"flow-{RUN}", "volumes": BINDS, "mem_limit": "1g",
        "memswap_limit": "1g", "privileged": False, "user": "10001:10001", "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"], "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=512m"}, "pids_limit": 512, "nano_cpus": 10**9,
        "log_config": {"type": "json-file", "config": {"max-size": "10m", "max-file": "2"}},
    }  # fmt: skip
    return {**base, **changes}


def test_the_templates_own_container_passes(policy):
    policy.check(settings(), ["stack_default"], BINDS)


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"privileged": True}, "privileged"),
        ({"user": "0:0"}, "user '0:0'"),
        ({"cap_drop": []}, "cap_drop []"),
        ({"cap_add": ["SYS_ADMIN"]}, "settings outside the template: cap_add"),
        ({"pid_mode": "host", "ipc_mode": "host"}, "settings outside the template: ipc_mode, pid_mode"),
        ({"network_mode": "host", "network": None}, "network mode 'host'"),
        ({"volumes": [*BINDS, "/:/host"]}, "volumes"),
        ({"volumes": ["stack_data:/data"]}, "volumes"),
        ({"read_only": False}, "read_only False"),
        ({"image": "evil.example/x:1"}, "not from the registry registry.example:5000"),
        ({"image": "registry.example:50000/x"}, "not from the registry"),
        ({"image": "registry.example:5000/subflow:latest"}, "is not pinned by digest"),
        ({"mem_limit": "0", "memswap_limit": "0"}, "mem_limit '0' outside"),
        ({"mem_limit": "64g", "memswap_limit": "64g"}, "mem_limit '64g' outside"),
        ({"memswap_limit": "-1"}, "memswap_limit differs"),
        ({"nano_cpus": 0}, "nano_cpus 0 outside"),
        ({"pids_limit": 10**6}, "pids_limit 1000000 outside"),
        ({"command": "sh -c 'id'"}, "command"),
        ({"extra_hosts": {"metadata.internal": "169.254.169.254"}}, "extra hosts"),
        ({"name": "gateway"}, "name 'gateway' is not the worker's own"),
        ({"name": f"flow-{RUN}.evil"}, "is not the worker's own"),
        ({"auto_remove": True}, "auto_remove True"),
        ({"log_config": {"type": "json-file", "config": {}}}, "log_config"),
    ],
)
def test_each_violation_is_refused_by_name(policy, changes, named):
    with pytest.raises(PolicyViolation, match="refused by pools/policy.json") as refused:
        policy.check(settings(**changes), ["stack_default"], BINDS)
    assert named in str(refused.value)


@pytest.mark.parametrize("networks", [["stack_default", "other_backend"], ["other"], []])
def test_every_network_is_checked_not_only_the_first(policy, networks):
    with pytest.raises(PolicyViolation, match=r"networks \["):
        policy.check(settings(), networks, BINDS)


def test_host_network_only_where_the_worker_has_it():
    remote = Policy(POOLS, {**ENV, "STACK_NETWORK": "", "DATA_VOLUME": "", "FLOW_HOST_NETWORK": "host"})
    remote.check(settings(network=None, network_mode="host", volumes=[]), [], [])
    with pytest.raises(PolicyViolation, match="volumes"):
        remote.check(settings(network=None, network_mode="host"), [], [])


def test_the_environment_is_the_pools_with_the_runs_own_credential(policy):
    given = {
        "PREFECT_API_URL": "http://prefect-server:4200/api", "PREFECT_API_AUTH_STRING": "admin:secret",
        "PIPELINE_DATA_URL": "http://prefect-server:4200/api",
        "PREFECT__FLOW_RUN_ID": "another", "PREFECT_WORKER_QUERY_SECONDS": "0.5",
    }  # fmt: skip
    env = policy.environment(given, "run-1", worker_keys={"PREFECT_WORKER_QUERY_SECONDS"})
    assert (
        env["PREFECT_API_AUTH_STRING"] == credential(b"k" * 64, "run-1")
        and env["PREFECT_API_URL"] == "http://gateway:4201/api"
    )
    assert run_of(env["PREFECT_API_AUTH_STRING"], b"k" * 64) == "run-1"  # what the gateway's authority reads
    assert env["PIPELINE_DATA_URL"] == "file:///store" and "SOURCE_ALLOW" not in env  # empty: dropped
    assert env["PREFECT__FLOW_RUN_ID"] == "run-1" and "PREFECT_WORKER_QUERY_SECONDS" not in env
    with pytest.raises(PolicyViolation, match="not in the pool's list: BROWSER, PYTHONWARNINGS, SOURCE_ALLOW"):
        policy.environment({"PYTHONWARNINGS": "x", "BROWSER": "y", "SOURCE_ALLOW": "*"}, "run-1", set())
    with pytest.raises(PolicyViolation, match="not in the pool's list: COMPONENT_IMAGE"):  # the worker's to say
        policy.environment({"COMPONENT_IMAGE": "registry.example:5000/honest@sha256:0"}, "run-1", set())


def test_memory_notation():
    assert [memory_bytes(v) for v in ("512m", "1g", "2048", "0", "-1", "1t", None)] == [
        512 << 20,
        1 << 30,
        2048,
        0,
        0,
        0,
        0,
    ]


def test_the_tail_is_bounded_in_lines_and_bytes_and_redacted():
    output = "".join(f"line {i} https://user:pass@host/x?X-Amz-Signature=abc token-123\n" for i in range(500))
    tail = tail_of(output.encode(), secrets=["token-123"])
    lines = tail.splitlines()
    assert len(lines) == TAIL_LINES and lines[-1].startswith("line 499 ")
    assert len(tail.encode()) <= TAIL_BYTES
    assert "pass" not in tail and "X-Amz-Signature" not in tail and "token-123" not in tail
    assert lines[-1] == "line 499 https://host/x ***"
    wide = tail_of(("x" * 100_000 + "\nlast\n").encode())
    assert len(wide.encode()) <= TAIL_BYTES and wide.endswith("\nlast")


IMPORT_FAILED = """\
14:02:01.123 | ERROR   | Flow run 'brisk-owl' - Unexpected exception encountered when trying to load flow
Traceback (most recent call last):
  File "/opt/prefect/pipeline/broken/broken.py", line 3, in <module>
    import notinstalled
ModuleNotFoundError: No module named 'notinstalled'
"""
# What the last 50 lines of a real one hold: the end of a long traceback, Prefect's wrapper last.
SCRIPT_FAILED = """\
  File "/usr/local/lib/python3.11/dist-packages/prefect/utilities/importtools.py", line 128, in load_script_as_module
    raise ScriptError(user_exc=exc, path=path) from exc
prefect.exceptions.ScriptError: Script at 'broken/broken.py' encountered an exception: \
ModuleNotFoundError("No module named 'notinstalled'")
"""


@pytest.mark.parametrize(
    "ended, failed, reason",
    [
        (Exit(1, False, IMPORT_FAILED, started=False), True, "ModuleNotFoundError: No module named 'notinstalled' "
         "(the component could not be loaded: add the module's package to the component's requirements.txt"),
        (Exit(1, False, SCRIPT_FAILED, started=False), True, "ModuleNotFoundError: No module named 'notinstalled' "
         "(the component could not be loaded"),
        # The same exit once the flow ran is the engine's, not the component's import: retried.
        (Exit(1, False, IMPORT_FAILED, started=True), False, "ModuleNotFoundError: No module named 'notinstalled'"),
        (Exit(1, False, "httpx.ConnectError: [Errno 111] Connection refused", started=False), False,
         "httpx.ConnectError: [Errno 111] Connection refused"),
        (Exit(137, True, "", True, "40m", "8g"), False,
         "Killed for memory: it went over its mem_limit of 40m; raise mem_limit in its deployment's job_variables, "
         "at most 8g (pools/policy.json)."),
        (Exit(137, False, "", True, "1g", "8g"), False, "Killed (SIGKILL), not for memory"),
        (Exit(2, False, "usage: something\n\n", started=False), False, "usage: something"),
    ],
)  # fmt: skip
def test_an_exit_says_why_in_one_line_and_whether_it_is_the_components_own(ended, failed, reason):
    assert ended.own_failure is failed
    assert ended.reason().startswith(reason) and "\n" not in ended.reason()
    assert ended.message().startswith(f"Flow run infrastructure exited with non-zero status code {ended.code}. ")


OTHER = "7d1e4c2a-9b3f-4e5d-8a6b-1c2d3e4f5a6b"


@pytest.fixture
def volume(tmp_path) -> mounts.Volume:
    return mounts.Volume("stack_data", "/host/data", "/store", tmp_path, os.getuid())


def test_a_main_flow_gets_its_run_the_cache_the_runs_to_read_and_its_uploaded_source(volume, tmp_path):
    source = f"file:///store/inbox/{'0' * 64}/sales.csv"
    assert mounts.for_main(volume, RUN, source) == [
        "/host/data/runs:/store/runs:ro",
        f"/host/data/runs/{RUN}:/store/runs/{RUN}:rw",
        "/host/data/cache:/store/cache:rw",
        f"/host/data/inbox/{'0' * 64}/sales.csv:/store/inbox/{'0' * 64}/sales.csv:ro",
    ]
    assert (tmp_path / "runs" / RUN).is_dir() and (tmp_path / "cache").is_dir()  # made for the binds
    assert mounts.for_main(volume, RUN, "https://example.com/x.csv")[-1] == "/host/data/cache:/store/cache:rw"


def test_a_step_gets_its_output_directory_and_its_inputs_files_only(volume, tmp_path):
    out, part = f"file:///store/runs/{RUN}/validate/part-00001", f"file:///store/runs/{OTHER}/input/part-00001.parquet"
    assert mounts.for_step(volume, RUN, out, [part, part]) == [
        f"/host/data/runs/{RUN}/validate/part-00001:/store/runs/{RUN}/validate/part-00001:rw",
        f"/host/data/runs/{OTHER}/input/part-00001.parquet:/store/runs/{OTHER}/input/part-00001.parquet:ro",
    ]
    assert (tmp_path / "runs" / RUN / "validate" / "part-00001").is_dir()


@pytest.mark.parametrize(
    ("out", "inputs", "refusal"),
    [
        (f"file:///store/runs/{OTHER}/validate", [], "is not in the directory of its main run"),
        ("file:///store/cache/validate", [], "is not in a run's directory"),
        ("file:///elsewhere/runs/x", [], "is not in the data store file:///store"),
        (f"file:///store/runs/{RUN}/../{OTHER}/x", [], "not a plain path"),
        (f"file:///store/runs/{RUN}/x", ["file:///etc/passwd"], "is not in the data store"),
        (f"file:///store/runs/{RUN}/x", [f"file:///store/runs/{RUN}/a:/host:rw"], "not a plain path"),
        (f"s3://bucket/runs/{RUN}/x", [], "is not in the data store"),
    ],
)
def test_a_step_gets_nothing_outside_its_run(volume, out, inputs, refusal):
    with pytest.raises(mounts.Refused, match=refusal):
        mounts.for_step(volume, RUN, out, inputs)


@pytest.fixture(scope="module")
def run_in(prefect_api):
    """A run on a real server in a given state, as the sweep reads it back."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deployment = client.create_deployment(client.create_flow_from_name("reaped"), "reaped")

        def make(state: State) -> FlowRun:
            run = client.create_flow_run_from_deployment(deployment)
            if state.is_cancelling():  # the server makes a Scheduled run's cancel Cancelled at once
                client.set_flow_run_state(run.id, Running(), force=True)
            client.set_flow_run_state(run.id, state, force=True)
            return client.read_flow_run(run.id)

        yield make


@pytest.mark.parametrize(
    ("state", "role", "main", "action", "why"),
    [
        (None, STEP, None, STOP, "unknown to the server"),
        (Completed(), STEP, None, STOP, "Completed"),
        (Crashed(), MAIN, None, STOP, "Crashed"),
        (Cancelled(), STEP, Running(), STOP, "Cancelled"),
        (Running(), STEP, Running(), None, ""),  # its pipeline goes on
        (Running(), STEP, None, None, ""),  # run by hand
        (Running(), STEP, Crashed(), CANCEL, "its pipeline's main run"),
        (Pending(), STEP, Failed(), CANCEL, "ended Failed"),
        (Running(), STEP, Cancelled(), CANCEL, "ended Cancelled"),
        (Running(), MAIN, None, None, ""),
        (Completed(), STEP, None, None, "now"),  # its engine may still be sending its last logs
    ],
)
def test_the_sweep_stops_what_is_over_and_cancels_the_steps_of_a_main_run_that_did_not_complete(
    run_in, state, role, main, action, why
):
    run = run_in(state) if state is not None else None
    # A minute after the run's last state, or at once ("now")
    now = datetime.now(UTC) + timedelta(seconds=0 if why == "now" else 60)
    decided, said = reaping(run, Role(role, run_in(main) if main is not None else None), now)
    assert decided == action and (why in said or why == "now"), said


@pytest.mark.parametrize(
    ("state_type", "pool", "woken"),
    [
        ("SCHEDULED", "pool-a", True),  # a run to start
        ("COMPLETED", "pool-a", True),  # a slot freed
        ("CRASHED", "pool-a", True),
        ("RUNNING", "pool-a", False),  # nothing new to find
        ("PENDING", "pool-a", False),
        ("SCHEDULED", "pool-b", False),  # another pool's
    ],
)
def test_a_worker_polls_when_its_pools_runs_are_scheduled_or_end(state_type, pool, woken):
    """The related resources a state change carries on Prefect's event stream (as the server emits it)."""
    event = Event(
        event=f"prefect.flow-run.{state_type.title()}",
        resource={"prefect.resource.id": "prefect.flow-run.1", "prefect.state-type": state_type},
        related=[
            {"prefect.resource.id": "prefect.flow.2", "prefect.resource.role": "flow", "prefect.resource.name": "x"},
            {"prefect.resource.id": "prefect.work-pool.3", "prefect.resource.role": "work-pool",
             "prefect.resource.name": pool},
        ],
    )  # fmt: skip
    assert wakes(event, "pool-a") is woken


@pytest.mark.parametrize(
    ("state", "after_s", "left"),
    [
        (Cancelling(), 60, True),  # its event missed, or its cancel failed: the sweep ends it
        (Cancelling(), 0, False),  # its worker is on it
        (Running(), 60, False),
        (Cancelled(), 60, False),
    ],
)
def test_the_sweep_ends_a_run_left_cancelling(run_in, state, after_s, left):
    assert left_cancelling(run_in(state), datetime.now(UTC) + timedelta(seconds=after_s)) is left
