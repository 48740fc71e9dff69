"""A compromised step: run in a flow container's image, network, user, environment and mounts
(tests/test_security.py), it tries what the findings of README's *Security* name, with only what that
container holds, and prints what each attempt got: an HTTP status, a refusal, or what it could do.

    python attacks.py <pool> <another run's id> <another run's step deployment id> <a file of another run>
"""

import json
import os
import sys
import uuid
from pathlib import Path

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

api, own = os.environ["PREFECT_API_URL"], os.environ["PREFECT__FLOW_RUN_ID"]
pool, other, deployment, their_file = sys.argv[1:5]
credential = os.environ["PREFECT_API_AUTH_STRING"]
auth = httpx.BasicAuth(*credential.split(":", 1))
admin_api = api.replace(":4201", ":4200")
csrf = {"Prefect-Csrf-Client": str(uuid.uuid4())}


def status(method: str, url: str, **kw) -> int | str:
    try:
        return httpx.request(method, url, auth=auth, headers=csrf, timeout=10, **kw).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def stream(url: str, first: dict, then: dict | None = None) -> str:
    """What a websocket of the API answers: `answered` if it sends anything back to `then`."""
    try:
        with connect(url.replace("http", "ws", 1), subprotocols=["prefect"], open_timeout=10) as ws:
            ws.send(json.dumps(first))
            reply = json.loads(ws.recv(timeout=10))
            if reply.get("type") != "auth_success":
                return f"refused: {reply.get('type')}"
            if then is None:
                return "answered"
            ws.send(json.dumps(then))
            ws.recv(timeout=10)
            return "answered"
    except InvalidStatus as exc:
        return f"refused: HTTP {exc.response.status_code}"
    except ConnectionClosed as exc:
        return f"refused: closed {exc.rcvd.code if exc.rcvd else None}"
    except TimeoutError:
        return "no answer"


def touch(path: str) -> str:
    try:
        Path(path).write_text("forged")
        return "written"
    except OSError as exc:
        return type(exc).__name__


def heartbeat(run_id: str) -> dict:
    return {
        "id": str(uuid.uuid4()), "occurred": "2026-01-01T00:00:00Z", "event": "prefect.flow-run.heartbeat",
        "resource": {"prefect.resource.id": f"prefect.flow-run.{run_id}"},
    }  # fmt: skip


forged = {"type": "COMPLETED", "name": "Completed", "data": {"type": "unpersisted"}}
print(
    json.dumps(
        {
            # The API, with this run's own credential
            "own run": status("GET", f"{api}/flow_runs/{own}"),
            "another run": status("GET", f"{api}/flow_runs/{other}"),
            "every run's parameters": status("POST", f"{api}/flow_runs/filter", json={}),
            "rename another run": status("PATCH", f"{api}/flow_runs/{other}", json={"name": "gateway"}),
            "repoint another run's container": status(
                "PATCH", f"{api}/flow_runs/{other}", json={"infrastructure_pid": "x"}
            ),
            "complete another run": status(
                "POST", f"{api}/flow_runs/{other}/set_state", json={"state": forged, "force": True}
            ),
            "start a run named gateway": status(
                "POST", f"{api}/deployments/{deployment}/create_flow_run", json={"name": "gateway"}
            ),
            "own run's image": status("PATCH", f"{api}/flow_runs/{own}", json={"job_variables": {"image": "x"}}),
            "registry password": status("POST", f"{api}/block_documents/filter", json={"include_secrets": True}),
            "write pool": status("PATCH", f"{api}/work_pools/{pool}", json={"base_job_template": {}}),
            "create work pool": status("POST", f"{api}/work_pools/", json={"name": "mine", "type": "pipeline-docker"}),
            "create deployment": status("POST", f"{api}/deployments/", json={}),
            "write automation": status("POST", f"{api}/automations/", json={}),
            "rewrite the steps": status("PATCH", f"{api}/variables/name/pipeline-steps-main", json={"value": []}),
            "another run's variable": status(
                "PATCH", f"{api}/variables/name/subflow-output-{other}", json={"value": {}}
            ),
            "a variable of any name": status(
                "POST", f"{api}/variables/", json={"name": "pipeline-steps-mine", "value": 1}
            ),
            # Its credential elsewhere, and no credential at all
            "admin listener": status("GET", f"{admin_api}/flow_runs/{own}"),
            "server itself": status("GET", f"http://prefect-server:4200/api/flow_runs/{own}"),
            "worker channel": stream(f"{api}/work_pools/{pool}/workers/connect", {"type": "auth", "token": credential}),
            "worker channel, admin listener": stream(
                f"{admin_api}/work_pools/{pool}/workers/connect", {"type": "auth", "token": None}
            ),
            "heartbeat with no credential": stream(f"{api}/events/in", {"type": "auth", "token": None}),
            "heartbeat with no credential, admin listener": stream(
                f"{admin_api}/events/in", {"type": "auth", "token": None}
            ),
            "another run's heartbeat": stream(
                f"{api}/events/in", {"type": "auth", "token": credential}, heartbeat(other)
            ),
            # The store, as mounted
            "store": sorted(str(p.relative_to("/data")) for p in Path("/data").rglob("*") if p.is_dir()),
            "read another run's file": Path(their_file).exists(),
            "forge a cache entry": touch("/data/cache/forged.json"),
            "environment": sorted(k for k in os.environ if k in {"PIPELINE_CACHE_KEY", "AWS_SECRET_ACCESS_KEY"}),
        }
    )
)
