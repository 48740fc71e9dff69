"""The e2e tests' stack: a compose project of their own, beside (never instead of) the user's."""

import tempfile
from pathlib import Path

import pytest

from tests.harness import CI, KEEP, SOURCES_BUCKET, Stack, docker_available

# Served by tests/compose.yml `testdata`: a directory the stack's container keeps mounted.
DATA = Path(tempfile.gettempdir(), "pipeline-testdata") if KEEP else Path(tempfile.mkdtemp(prefix="pipeline-testdata-"))
DATA_URL = "http://testdata:8000"
TEST = Stack(
    "modular-pipeline-test",
    prefect_port=14200,
    registry_port=15000,
    s3_port=19000,
    overrides={
        "SOURCE_ALLOW": f"{DATA_URL}/,s3://{SOURCES_BUCKET}/",
        "TEST_DATA": str(DATA),
    },
)


@pytest.fixture(scope="session")
def serve(stack):
    """Put a dataset on the test data server: serve(name, content) -> its URL as the flows see it."""

    def put(name: str, content: str | bytes) -> str:
        (DATA / name).write_bytes(content.encode() if isinstance(content, str) else content)
        (DATA / name).chmod(0o644)
        return f"{DATA_URL}/{name}"

    return put


@pytest.fixture(scope="session")
def stack():
    """The test stack, up and deployed; afterwards removed, and the user's stack proven untouched."""
    if not docker_available():
        if CI:
            pytest.fail("CI=true but no Docker engine is reachable: the e2e tests must run")
        pytest.skip("no Docker engine reachable")
    user = Stack.user()
    try:
        before = user.snapshot() if user.running() else None
    except Exception as exc:  # e.g. 401: another clone started the stack since this one last did
        pytest.fail(
            f"cannot read the user's stack at {user.api_url} with .secrets/{user.project}/ "
            f"(`make up` here copies the stack's secrets there): {exc}"
        )
    if before is None and CI:
        pytest.fail("CI=true: bring the user's stack up first (make pipeline), so the suite proves it stays untouched")
    DATA.mkdir(exist_ok=True)
    DATA.chmod(0o755)
    if not KEEP:
        TEST.down()  # what an interrupted session may have left
    TEST.up()
    TEST.deploy()
    yield TEST
    if not KEEP:
        TEST.down()
    if before is not None:
        assert user.snapshot() == before, "the test suite changed the user's stack"
