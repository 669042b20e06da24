"""Helpers to drive a real casa-kernel through jupyter_client in tests."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec

KERNEL_CMD = [sys.executable, "-m", "casa_kernel", "-f", "{connection_file}"]


@dataclass
class Reply:
    """Everything one execute request produced."""

    status: str = ""
    stdout: str = ""
    stderr: str = ""
    result: str | None = None  # text/plain of execute_result
    displays: list[dict[str, Any]] = field(default_factory=list)
    ename: str | None = None
    evalue: str | None = None
    traceback: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)  # every IOPub message

    def display_messages(self) -> list[tuple[str, dict[str, Any]]]:
        """(msg_type, content) of display_data and update_display_data, in order."""
        kinds = ("display_data", "update_display_data")
        return [(m["msg_type"], m["content"]) for m in self.messages if m["msg_type"] in kinds]

    @property
    def error(self) -> str:
        """The error as the user sees it (UsageError is printed, not raised)."""
        return "\n".join(t for t in (self.evalue, self.stderr) if t)


def execute(kc: Any, code: str, timeout: float = 180, on_output: Any = None) -> Reply:
    """Run ``code``; everything it produced. ``on_output(reply)`` is called after
    each of its messages (a test acts when the servers printed a marker: events,
    not sleeps)."""
    msg_id = kc.execute(code)
    reply = Reply()
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        reply.messages.append({"msg_type": kind, "content": content})
        if kind == "stream":
            if content["name"] == "stdout":
                reply.stdout += content["text"]
            else:
                reply.stderr += content["text"]
        elif kind == "execute_result":
            reply.result = content["data"].get("text/plain")
        elif kind == "display_data":
            reply.displays.append(content["data"])
        elif kind == "error":
            reply.ename, reply.evalue = content["ename"], content["evalue"]
            reply.traceback = "\n".join(content["traceback"])
        elif kind == "status" and content["execution_state"] == "idle":
            break
        if on_output is not None:
            on_output(reply)
    while True:
        # wait_for_ready() may have sent several kernel_info requests to a kernel
        # slow to start: their late replies are not this request's
        shell = kc.get_shell_msg(timeout=max(1, deadline - time.monotonic()))
        if shell["parent_header"].get("msg_id") == msg_id:
            break
    reply.status = shell["content"]["status"]
    return reply


def kernel_env(**overrides: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("CASA_KERNEL_NPROCS", "CASA_KERNEL_HOSTFILE", "CASA_KERNEL_MPIEXEC"):
        env.pop(key, None)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@contextlib.contextmanager
def running_kernel(
    env: dict[str, str] | None = None, kernel_name: str | None = None, cwd: str | None = None
) -> Iterator[tuple[KernelManager, Any]]:
    """A started kernel and a ready client; shut down (cleanly) afterwards."""
    if kernel_name:
        km = KernelManager(kernel_name=kernel_name)
    else:
        km = KernelManager(kernel_name="")
        km._kernel_spec = KernelSpec(
            argv=KERNEL_CMD,
            display_name="CASA (test)",
            language="python",
            interrupt_mode="signal",
        )
    km.start_kernel(env=env if env is not None else kernel_env(), cwd=cwd)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=False)


def kernel_pid(km: KernelManager) -> int:
    return km.provisioner.process.pid  # type: ignore[union-attr]


def cluster_processes(pid: int) -> list[psutil.Process]:
    """Every process of the cluster of the kernel with this pid.

    The controller, mpiexec/prterun, the engines and their helpers all carry
    CASA_KERNEL_OWNER=<kernel pid> in their environment, orphaned or not.
    """
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != pid and proc.environ().get("CASA_KERNEL_OWNER") == str(pid):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def wait_gone(pid: int, timeout: float) -> list[psutil.Process]:
    """Wait until no process of that kernel's cluster is left; return stragglers."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        left = [p for p in cluster_processes(pid) if p.is_running() and p.status() != "zombie"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def make_mms(root: str | os.PathLike[str], name: str, **size: int) -> tuple[str, str]:
    """Simulate ``<root>/<name>.ms`` and partition it into a 4-sub-MS Multi-MS."""
    from casatasks import partition

    from casa_kernel.casa.simulate import simulate_ms

    ms = simulate_ms(os.path.join(root, f"{name}.ms"), **size)
    mms = os.path.join(root, f"{name}.mms")
    partition(vis=ms, outputvis=mms, createmms=True, separationaxis="auto", numsubms=4)
    if len(os.listdir(os.path.join(mms, "SUBMSS"))) != 4:
        raise RuntimeError(f"partition did not make 4 sub-MSs of {ms}")
    return ms, mms
