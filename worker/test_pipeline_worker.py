"""The workers' container policy (pipeline_worker.py) against the repository's pools/."""

from pathlib import Path

import pytest
from pipeline_worker import Policy, PolicyViolation, memory_bytes

POOLS = Path(__file__).resolve().parent.parent / "pools"
ENV = {
    "PIPELINE_DATA_URL": "file:///store", "AWS_ENDPOINT_URL": "", "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
    "AWS_DEFAULT_REGION": "", "SOURCE_ALLOW": "", "FLOW_UID": "10001", "REGISTRY": "registry.example:5000",
    "STACK_NETWORK": "stack_default", "DATA_VOLUME": "stack_data:/data", "FLOW_API_URL": "http://gateway:4201/api",
    "FLOW_AUTH_STRING": "flow:secret", "PREFECT_CLIENT_MAX_RETRIES": "6", "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
}  # fmt: skip


@pytest.fixture
def policy() -> Policy:
    return Policy(POOLS, ENV)


def settings(**changes: object) -> dict:
    """Container settings as prefect-docker builds them from the repository's template."""
    base = {
        "image": "registry.example:5000/subflow@sha256:" + "0" * 64, "network": "stack_default", "network_mode": None,
        "command": "python -m prefect.engine", "environment": {}, "auto_remove": True, "labels": {},
        "extra_hosts": None, "name": "run", "volumes": ["stack_data:/data"], "mem_limit": "1g",
        "memswap_limit": "1g", "privileged": False, "user": "10001:10001", "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"], "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=512m"}, "pids_limit": 512, "nano_cpus": 10**9,
    }  # fmt: skip
    return {**base, **changes}


def test_the_templates_own_container_passes(policy):
    policy.check(settings())


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"privileged": True}, "privileged"),
        ({"user": "0:0"}, "user '0:0'"),
        ({"cap_drop": []}, "cap_drop []"),
        ({"cap_add": ["SYS_ADMIN"]}, "settings outside the template: cap_add"),
        ({"pid_mode": "host", "ipc_mode": "host"}, "settings outside the template: ipc_mode, pid_mode"),
        ({"network_mode": "host", "network": None}, "network mode 'host'"),
        ({"volumes": ["stack_data:/data", "/:/host"]}, "volumes"),
        ({"read_only": False}, "read_only False"),
        ({"image": "evil.example/x:1"}, "not from the registry registry.example:5000"),
        ({"image": "registry.example:50000/x"}, "not from the registry"),
        ({"mem_limit": "0", "memswap_limit": "0"}, "mem_limit '0' outside"),
        ({"mem_limit": "64g", "memswap_limit": "64g"}, "mem_limit '64g' outside"),
        ({"memswap_limit": "-1"}, "memswap_limit differs"),
        ({"nano_cpus": 0}, "nano_cpus 0 outside"),
        ({"pids_limit": 10**6}, "pids_limit 1000000 outside"),
        ({"command": "sh -c 'id'"}, "command"),
        ({"extra_hosts": {"metadata.internal": "169.254.169.254"}}, "extra hosts"),
    ],
)
def test_each_violation_is_refused_by_name(policy, changes, named):
    with pytest.raises(PolicyViolation, match="refused by pools/policy.json") as refused:
        policy.check(settings(**changes))
    assert named in str(refused.value)


def test_host_network_only_where_the_worker_has_it():
    remote = Policy(POOLS, {**ENV, "STACK_NETWORK": "", "DATA_VOLUME": "", "FLOW_HOST_NETWORK": "host"})
    remote.check(settings(network=None, network_mode="host", volumes=[]))
    with pytest.raises(PolicyViolation, match="volumes"):
        remote.check(settings(network=None, network_mode="host"))


def test_the_environment_is_the_pools_with_the_flow_credential(policy):
    given = {
        "PREFECT_API_URL": "http://prefect-server:4200/api", "PREFECT_API_AUTH_STRING": "admin:secret",
        "PIPELINE_DATA_URL": "http://prefect-server:4200/api",
        "PREFECT__FLOW_RUN_ID": "another", "PREFECT_WORKER_QUERY_SECONDS": "0.5",
        "COMPONENT_IMAGE": "registry.example:5000/subflow@sha256:abc",  # templated by Prefect: {{ image }}
    }  # fmt: skip
    env = policy.environment(given, "run-1", worker_keys={"PREFECT_WORKER_QUERY_SECONDS"})
    assert env["PREFECT_API_AUTH_STRING"] == "flow:secret" and env["PREFECT_API_URL"] == "http://gateway:4201/api"
    assert env["PIPELINE_DATA_URL"] == "file:///store" and "SOURCE_ALLOW" not in env  # empty: dropped
    assert env["PREFECT__FLOW_RUN_ID"] == "run-1" and "PREFECT_WORKER_QUERY_SECONDS" not in env
    assert env["COMPONENT_IMAGE"] == "registry.example:5000/subflow@sha256:abc"
    with pytest.raises(PolicyViolation, match="not in the pool's list: BROWSER, PYTHONWARNINGS, SOURCE_ALLOW"):
        policy.environment({"PYTHONWARNINGS": "x", "BROWSER": "y", "SOURCE_ALLOW": "*"}, "run-1", set())


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
