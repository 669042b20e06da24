"""Drive a JupyterHub on the Slurm of ``tests/slurm_harness.py`` through its REST API.

Run on the login node (inside the Slurm's namespaces, where the hub listens on
127.0.0.1) by ``tests/test_jupyterhub.py``, which started the hub. As a user's
browser would, but through the APIs: create the user, spawn their server (a
Slurm job, batchspawner's SlurmSpawner), start a kernel in it through the
server's REST API, run cells over the kernel's websocket, stop the server.
Prints one JSON object per line on stdout, as ``driver.py`` does; the test
asserts on them. Whatever happens, the server is asked to stop before exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import psutil
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

SPMD_CELL = """%%casa_parallel
from mpi4py import MPI
(rank, comm.Get_size(), MPI.Get_processor_name(), comm.allreduce(rank))
"""
WHERE_CELL = "import os\n(os.getpid(), os.uname().nodename)"


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job``'s KEY=VALUE fields of one job."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
    ).stdout
    return dict(word.split("=", 1) for word in out.split() if "=" in word)


def queue() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %j %N"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def marked(marker: str) -> list[str]:
    """Command lines of the processes whose environment holds ``marker`` (NAME=VALUE)."""
    name, value = marker.split("=", 1)
    found = []
    for proc in psutil.process_iter(["environ", "cmdline"]):
        try:
            if (proc.info["environ"] or {}).get(name) == value:
                found.append(" ".join(proc.info["cmdline"] or []))
        except psutil.Error:
            continue
    return found


class Hub:
    """The hub's REST API (and, through its proxy, the user's server's), with a token."""

    def __init__(self, url: str, token: str, hub_pid: int):
        self.url = url.rstrip("/")
        self.token = token
        self.hub_pid = hub_pid

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                text = resp.read().decode()
                return resp.status, json.loads(text) if text.strip() else None
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            return exc.code, text

    def alive(self) -> None:
        try:
            os.kill(self.hub_pid, 0)
        except ProcessLookupError:
            raise SystemExit(f"the hub (pid {self.hub_pid}) exited") from None

    def wait(self, what: str, check: Any, timeout: float) -> Any:
        """``check()`` until it returns something true; back off, watch the hub."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            self.alive()
            try:
                got = check()
            except (urllib.error.URLError, ConnectionError):
                got = None
            if got:
                return got
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def user(self, name: str) -> dict[str, Any]:
        code, model = self.request("GET", f"/hub/api/users/{name}")
        assert code == 200, (code, model)
        return model


def message(msg_type: str, content: dict[str, Any], session: str) -> dict[str, Any]:
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "username": "test",
        "session": session,
        "version": "5.3",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {
        "header": header,
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": "shell",
        "buffers": [],
    }


class KernelSocket:
    """The kernel's websocket (``/api/kernels/ID/channels``) of a Jupyter server,
    in the JSON message format a browser uses."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.session = uuid.uuid4().hex

    async def request(self, msg_type: str, content: dict[str, Any], timeout: float) -> dict:
        """Send a shell request; gather its IOPub output until its reply and idle."""
        msg = message(msg_type, content, self.session)
        msg_id = msg["header"]["msg_id"]
        await self.conn.write_message(json.dumps(msg))
        got: dict[str, Any] = {"stdout": "", "stderr": "", "result": None, "error": None}
        replied = idle = False
        deadline = time.monotonic() + timeout
        while not (replied and idle):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {msg_type} within {timeout:.0f} s: {got}")
            raw = await asyncio.wait_for(self.conn.read_message(), left)
            if raw is None:
                raise ConnectionError(f"websocket closed during {msg_type}: {got}")
            reply = json.loads(raw)
            if reply.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, body = reply["msg_type"], reply["content"]
            if reply["channel"] == "shell":
                replied = True
                got["status"] = body.get("status")
            elif kind == "status":
                idle = body["execution_state"] == "idle"
            elif kind == "stream":
                got[body["name"]] += body["text"]
            elif kind == "execute_result":
                got["result"] = body["data"].get("text/plain")
            elif kind == "error":
                got["error"] = (
                    f"{body['ename']}: {body['evalue']}\n" + "\n".join(body["traceback"])[-3000:]
                )
        return got

    async def execute(self, code: str, timeout: float) -> dict[str, Any]:
        started = time.monotonic()
        got = await self.request("execute_request", {"code": code, "silent": False}, timeout)
        got["seconds"] = round(time.monotonic() - started, 2)
        return got


async def run_kernel(hub: Hub, server: str, kernel: str, timeout: float, marker: str) -> None:
    """Start ``kernel`` in the server, run the cells, shut the kernel down."""
    started = time.monotonic()
    code, model = hub.request("POST", f"{server}api/kernels", {"name": kernel})
    emit(kernel_start=[code, model], kernel_start_seconds=round(time.monotonic() - started, 2))
    if code != 201:
        return
    kernel_id = model["id"]
    ws_url = hub.url.replace("http", "ws", 1) + f"{server}api/kernels/{kernel_id}/channels"
    conn = await websocket_connect(
        HTTPRequest(ws_url, headers={"Authorization": f"token {hub.token}"}, connect_timeout=30)
    )
    try:
        sock = KernelSocket(conn)
        started = time.monotonic()
        # The kernel answers kernel_info once its start-up (CASA, the cluster) is done.
        info = await sock.request("kernel_info_request", {}, timeout)
        emit(kernel_info=info, kernel_ready_seconds=round(time.monotonic() - started, 2))
        emit(where=await sock.execute(WHERE_CELL, 60))
        emit(parallel=await sock.execute(SPMD_CELL, timeout))
        emit(status=await sock.execute("%casa_cluster status", 60))
        emit(queue_while_running=queue(), processes_while_running=marked(marker))
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True, help="the hub's public URL")
    parser.add_argument("--token", required=True, help="an API token with admin scopes")
    parser.add_argument("--hub-pid", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--kernel", default="casa-mpi")
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument(
        "--marker", required=True, help="NAME=VALUE in the environment of the test's processes"
    )
    args = parser.parse_args()
    hub = Hub(args.url, args.token, args.hub_pid)
    started = time.monotonic()
    hub.wait("the hub's API", lambda: hub.request("GET", "/hub/api/")[0] == 200, 60)
    emit(hub_ready_seconds=round(time.monotonic() - started, 2))
    code, model = hub.request("POST", f"/hub/api/users/{args.user}")
    emit(create_user=code)
    spawn_requested = False
    try:
        started = time.monotonic()
        code, model = hub.request("POST", f"/hub/api/users/{args.user}/server")
        spawn_requested = True
        emit(spawn=[code, model])

        def ready() -> dict[str, Any] | None:
            server = hub.user(args.user)["servers"].get("")
            if server and not server["ready"] and not server["pending"]:
                raise SystemExit(f"the server failed to start: {server}")
            return server if server and server["ready"] else None

        server = hub.wait("the user's server", ready, args.timeout)
        emit(
            server=server,
            spawn_seconds=round(time.monotonic() - started, 2),
            queue_with_server=queue(),
            job=job_fields(server["state"].get("job_id", "")),
        )
        asyncio.run(run_kernel(hub, server["url"], args.kernel, args.timeout, args.marker))
    finally:
        if spawn_requested:
            started = time.monotonic()
            code, model = hub.request("DELETE", f"/hub/api/users/{args.user}/server")
            emit(stop=[code, model])
            hub.wait(
                "the server to stop",
                lambda: "" not in hub.user(args.user)["servers"],
                args.timeout,
            )
            emit(stop_seconds=round(time.monotonic() - started, 2), queue_after_stop=queue())


if __name__ == "__main__":
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            emit(failed=str(exc.code))
        sys.exit(1 if exc.code not in (None, 0) else 0)
