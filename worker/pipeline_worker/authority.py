"""The gateway's authority over flow containers (docker-compose.yml `authority`, behind the
gateway's flow listener, :4201): each request a flow run's container makes is checked against that
run (rules.py), then sent on to the server with the admin credential, which no flow container holds.

A container's credential is its own run's, `<run id>:<HMAC-SHA256 of the run id>`, minted by the
worker that starts it (policy.credential) with a key that only the workers and this service read
(/secrets/flow-run-key).
Prefect's clients send it as their auth string: in HTTP Basic, and in the first message of the
event streams, where this service, unlike a proxy that only reads headers, checks it too and then
checks every event the container sends, and every filter it watches with.
"""

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from pipeline_worker.policy import credential
from pipeline_worker.rules import MAIN, STEP, Run, decide, event_refusal, narrowed, roles, steps_variable

SERVER = os.environ.get("PREFECT_SERVER_URL", "http://prefect-server:4200")
SECRETS = Path(os.environ.get("PIPELINE_SECRETS", "/secrets"))
FACTS_S = 30.0  # how long what is known of a run is kept; its pipeline never changes
UPSTREAM_WAIT_S = 120.0  # how long a stream waits for the server to come back (a restart)
# Not sent on to the server: this hop's own, and the container's credential.
HOP = {"host", "authorization", "connection", "content-length", "transfer-encoding", "upgrade", "keep-alive"}
POLICY_VIOLATION = 1008
log = logging.getLogger("authority")


def run_of(given: str | None, key: bytes) -> str | None:
    """The run an auth string `<run id>:<mac>` is good for (policy.credential made it), or None."""
    run_id = (given or "").partition(":")[0]
    return run_id if run_id and hmac.compare_digest(given or "", credential(key, run_id)) else None


def basic(header: str | None) -> str | None:
    """The auth string of an HTTP Basic Authorization header."""
    scheme, _, encoded = (header or "").partition(" ")
    try:
        return base64.b64decode(encoded, validate=True).decode() if scheme == "Basic" else None
    except (binascii.Error, UnicodeDecodeError):
        return None


class Server:
    """The Prefect server, read with the admin credential: what the rules need to know."""

    def __init__(self, url: str, auth: str | None, roles: dict[str, str], store: str):
        headers = {"Authorization": f"Basic {base64.b64encode(auth.encode()).decode()}"} if auth else {}
        self.http = httpx.AsyncClient(base_url=url, headers=headers, timeout=60)
        self.auth, self.roles, self.store = auth, roles, store.rstrip("/")
        self._csrf: dict[str, str] = {}  # the server wants a token on writes and filters, as for any client
        self._task_runs: dict[str, str] = {}  # task run: its flow run (never changes)
        self._deployments: dict[str, dict[str, Any]] = {}
        self._runs: dict[str, tuple[float, Run]] = {}

    async def get(self, path: str) -> dict[str, Any] | None:
        response = await self.http.get(f"/api{path}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    async def task_run_flow(self, task_run_id: str) -> str | None:
        if task_run_id not in self._task_runs:
            found = await self.get(f"/task_runs/{task_run_id}") if task_run_id != "None" else None
            if found is None or not found.get("flow_run_id"):
                return None
            self._task_runs[task_run_id] = found["flow_run_id"]
        return self._task_runs[task_run_id]

    async def parent_flow(self, flow_run_id: str) -> str | None:
        found = await self.get(f"/flow_runs/{flow_run_id}")
        parent = (found or {}).get("parent_task_run_id")
        return await self.task_run_flow(parent) if parent else None

    async def deployment_of(self, flow_run_id: str) -> str | None:
        return ((await self.get(f"/flow_runs/{flow_run_id}")) or {}).get("deployment_id")

    async def deployment(self, deployment_id: str) -> dict[str, Any]:
        if deployment_id not in self._deployments:
            found = await self.get(f"/deployments/{deployment_id}") or {}
            flow = await self.get(f"/flows/{found['flow_id']}") if found else None
            self._deployments[deployment_id] = {
                **found,
                "full_name": f"{flow['name']}/{found['name']}" if flow else None,
            }
        return self._deployments[deployment_id]

    async def deployment_name(self, deployment_id: str) -> str | None:
        return (await self.deployment(deployment_id)).get("full_name")

    async def deployment_image(self, deployment_id: str) -> str | None:
        return ((await self.deployment(deployment_id)).get("job_variables") or {}).get("image")

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        for _ in range(2):
            if not self._csrf:
                client = str(uuid.uuid4())
                token = await self.http.get(f"/api/csrf-token?client={client}")
                self._csrf = {"Prefect-Csrf-Client": client}
                if token.status_code == 200:  # else the server has CSRF protection off
                    self._csrf["Prefect-Csrf-Token"] = token.json()["token"]
            response = await self.http.post(f"/api{path}", json=body, headers=self._csrf)
            if response.status_code == 403 and "CSRF" in response.text:
                self._csrf = {}  # expired: once more, with a new token
                continue
            response.raise_for_status()
            return response.json()
        raise PermissionError(f"the server refused the authority's CSRF token for {path}")

    async def children(self, flow_run_id: str) -> set[str]:
        query = {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
        return {run["id"] for run in await self.post("/flow_runs/filter", query)}

    async def run(self, run_id: str) -> Run | None:
        """What is known of a run: its role, its ids, and a main flow's pipeline."""
        cached = self._runs.get(run_id)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        found = await self.get(f"/flow_runs/{run_id}")
        if found is None:
            return None
        flow = await self.get(f"/flows/{found['flow_id']}") or {}
        role = self.roles.get(flow.get("name", ""), STEP)
        deployment_id = found.get("deployment_id")
        pipeline = (await self.deployment(deployment_id)).get("name") if role == MAIN and deployment_id else None
        steps = await self.pipeline(found, pipeline) if role == MAIN else frozenset()
        run = Run(
            id=run_id, role=role, deployment_id=deployment_id,
            parent_task_run_id=found.get("parent_task_run_id"), work_queue_id=found.get("work_queue_id"),
            work_pool_name=found.get("work_pool_name"), steps=steps, store=self.store, pipeline=pipeline,
        )  # fmt: skip
        self._runs[run_id] = (time.monotonic() + FACTS_S, run)
        return run

    async def run_waiting(self, run_id: str) -> Run | None:
        """`run`, waiting up to UPSTREAM_WAIT_S for a server that is away (a restart)."""
        deadline = time.monotonic() + UPSTREAM_WAIT_S
        while True:
            try:
                return await self.run(run_id)
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"the server is away: {exc!r}") from exc
                await asyncio.sleep(1)

    async def pipeline(self, found: dict[str, Any], pipeline: str | None) -> frozenset[str]:
        """The deployments a main run may start: its `steps`, a resumed run's, or those its
        pipeline (its deployment's name) has registered."""
        parameters = found.get("parameters") or {}
        declared = [parameters.get("steps")]
        if resumed := parameters.get("resume_from"):
            declared.append(((await self.get(f"/flow_runs/{resumed}")) or {}).get("parameters", {}).get("steps"))
        if all(steps is None for steps in declared) and pipeline:
            declared.append(((await self.get(f"/variables/name/{steps_variable(pipeline)}")) or {}).get("value"))
        return frozenset(name for steps in declared for name in step_names(steps))


def step_names(steps: Any) -> list[str]:
    """The deployment names of a pipeline's steps, in any of its forms."""
    if isinstance(steps, str):
        return [steps]
    if isinstance(steps, dict):
        return [str(steps["step"])] if "step" in steps else []
    if isinstance(steps, list):
        return [name for step in steps for name in step_names(step)]
    return []


def refused(reason: str, body: bytes = b"") -> Response:
    log.warning("refused: %s%s", reason, f" (body: {body[:300]!r})" if body else "")
    return JSONResponse({"detail": f"refused by the gateway's authority: {reason}"}, status_code=403)


class Authority:
    """The service: the flow-run key, the server, and the two ways in, HTTP and the event streams."""

    def __init__(self, key: bytes, server: Server):
        self.key, self.server = key, server
        self.websocket_url = SERVER.replace("http", "ws", 1)

    async def http(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        if path == "/api/health" and method == "GET":  # probes, as the server has them
            return await self.forward(request, b"")
        run_id = run_of(basic(request.headers.get("authorization")), self.key)
        raw = await request.body()
        try:
            run = await self.server.run(run_id) if run_id else None
            if run is None:
                return JSONResponse({"detail": "a flow run's own credential is required"}, status_code=401)
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                return refused(f"{method} {path}: a body that is not JSON")
            reason = await decide(method, path, dict(request.query_params), body, run, self.server)
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:  # the server away (a restart)
            log.warning("%s %s: the server is away: %r", method, path, exc)
            return Response(status_code=503)  # Prefect's clients retry these
        if reason:
            return refused(f"run {run.id}: {reason}", raw)
        return await self.forward(request, raw)

    async def forward(self, request: Request, body: bytes) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            answer = await self.server.http.request(request.method, url, content=body, headers=headers)
        except httpx.TimeoutException:
            return Response(status_code=504)  # Prefect's clients retry these (.env)
        except httpx.TransportError:
            return Response(status_code=502)
        drop = {"content-length", "content-encoding", "transfer-encoding", "connection"}
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in drop}
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    async def events_in(self, websocket: WebSocket) -> None:
        """Events a container emits: each about its own run, or its own task runs."""
        async with self.stream(websocket, "/api/events/in") as (run, upstream):
            if run is None:
                return
            async for text in websocket.iter_text():
                if reason := await event_refusal(json.loads(text), run, self.server):
                    log.warning("refused: run %s: %s", run.id, reason)
                    await websocket.close(POLICY_VIOLATION, reason=reason[:120])
                    return
                await upstream.send(text)

    async def events_out(self, websocket: WebSocket) -> None:
        """Events a container watches: of its own run and the step runs it started."""
        async with self.stream(websocket, "/api/events/out") as (run, upstream):
            if run is None:
                return
            message = await websocket.receive_json()
            children = await self.server.children(run.id) if run.role == MAIN else set()
            event_filter, reason = narrowed(message.get("filter") or {}, run, children)
            if message.get("type") != "filter" or reason:
                reason = reason or "expected a filter message"
                log.warning("refused: run %s: %s (%s)", run.id, reason, json.dumps(message)[:300])
                await websocket.close(POLICY_VIOLATION, reason=reason[:120])
                return
            await upstream.send(json.dumps({**message, "filter": event_filter}))
            relay = asyncio.create_task(self.relay(upstream.socket, websocket))
            try:
                while True:  # the client sends nothing more, but its closing ends the relay
                    await websocket.receive_text()
            except WebSocketDisconnect:
                pass
            finally:
                relay.cancel()

    @staticmethod
    async def relay(upstream: Any, websocket: WebSocket) -> None:
        try:
            async for message in upstream:
                await websocket.send_text(message)
        except ConnectionClosed:
            pass
        await websocket.close()

    def stream(self, websocket: WebSocket, path: str) -> "Stream":
        return Stream(self, websocket, path)

    async def refuse_stream(self, websocket: WebSocket) -> None:
        await websocket.close(POLICY_VIOLATION, reason="not a stream a flow run uses")


class Upstream:
    """The server's side of one event stream, as admin. The server may restart under a stream: then
    it connects again, for up to UPSTREAM_WAIT_S, holding the container's events meanwhile, so a run's
    heartbeats arrive late rather than never (a container's own client drops them: it cannot tell
    the authority's refusal from the server's absence)."""

    def __init__(self, url: str, auth: str | None):
        self.url, self.auth = url, auth
        self.socket: Any = None

    async def connect(self) -> None:
        deadline = time.monotonic() + UPSTREAM_WAIT_S
        while True:
            try:
                self.socket = await connect(self.url, subprotocols=["prefect"])
                await self.socket.send(json.dumps({"type": "auth", "token": self.auth}))
                if json.loads(await self.socket.recv()).get("type") != "auth_success":
                    raise PermissionError("the server refused the admin credential")
                return
            except (OSError, WebSocketException, ValueError) as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"the server is away: {exc!r}") from exc
                log.info("stream %s: the server is away (%r); again in 1 s", self.url, exc)
                await asyncio.sleep(1)

    async def send(self, text: str) -> None:
        """Send `text`, connecting again first if the server went away."""
        for _ in range(2):
            if self.socket is None:
                await self.connect()
            try:
                await self.socket.send(text)
                return
            except ConnectionClosed:
                self.socket = None
        raise ConnectionError(f"stream {self.url}: closed twice in a row")

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()


class Stream:
    """One of Prefect's event streams, authenticated as Prefect's clients do it (the first message),
    with the container's credential here and the admin one upstream."""

    def __init__(self, authority: Authority, websocket: WebSocket, path: str):
        self.authority, self.websocket, self.path = authority, websocket, path
        self.upstream = Upstream(f"{authority.websocket_url}{path}", authority.server.auth)

    async def __aenter__(self) -> tuple[Run | None, Upstream]:
        websocket, server = self.websocket, self.authority.server
        await websocket.accept(subprotocol="prefect")
        try:
            message = await websocket.receive_json()
        except (WebSocketDisconnect, ValueError):
            return None, self.upstream
        run_id = run_of(message.get("token"), self.authority.key) if message.get("type") == "auth" else None
        run = await server.run_waiting(run_id) if run_id else None
        if run is None:
            await websocket.close(POLICY_VIOLATION, reason="a flow run's own credential is required")
            return None, self.upstream
        await websocket.send_json({"type": "auth_success"})
        return run, self.upstream

    async def __aexit__(self, *exc_info: Any) -> bool:
        await self.upstream.close()
        if exc_info[0] is ConnectionError:  # the server stayed away: the client connects again later
            log.warning("stream %s: %s", self.path, exc_info[1])
            await self.websocket.close(1013, reason="the server is away")
            return True
        return exc_info[0] in (WebSocketDisconnect, ConnectionClosed)  # a side that went away


def create_app() -> Starlette:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    key = (SECRETS / "flow-run-key").read_bytes().strip()
    admin = (SECRETS / "api-auth-string").read_text().strip()
    authority = Authority(key, Server(SERVER, admin, roles(os.environ["FLOW_ROLES"]), os.environ["PIPELINE_DATA_URL"]))
    methods = ["GET", "POST", "PATCH", "PUT", "DELETE"]
    return Starlette(
        routes=[
            WebSocketRoute("/api/events/in", authority.events_in),
            WebSocketRoute("/api/events/out", authority.events_out),
            WebSocketRoute("/{path:path}", authority.refuse_stream),
            Route("/{path:path}", authority.http, methods=methods),
        ]
    )
