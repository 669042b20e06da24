"""End to end in a real browser, as a user does it: JupyterLab + headless Chromium.

The kernelspec is installed with ``casa-kernel install`` into a temp prefix,
JupyterLab is started on it (every Jupyter folder in tmp, nothing read from or
written to ``~``), and Chromium, driven by playwright, clicks the "CASA (MPI)"
launcher tile, runs ``%%casa_parallel`` / ``rank`` and ``%casa_cluster status``
and reads what the page shows. The kernel is then shut down through the REST
API, JupyterLab with SIGTERM, and no process of the kernel's cluster may be left.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install -y chromium``;
no ``playwright install``) and the ``playwright`` and ``jupyterlab`` packages.
They are installed by CI, so a missing one FAILS this test (it does not skip).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from kernels import cluster_processes, wait_gone

BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KERNEL_NAME = "casa-mpi"
DISPLAY_NAME = "CASA (MPI)"
TOKEN = "casa-kernel-browser-test"
# Generous on purpose: the machine is shared (2 cores, other suites running).
# Every wait fails with a message when its time is up; nothing waits forever.
LAB_START_TIMEOUT = 90.0  # s, until /api/status answers
UI_TIMEOUT_MS = 120_000  # ms, one page event (tile shown, kernel idle, cell done)
CLI_TIMEOUT = 120.0  # s, `casa-kernel install`
SHUTDOWN_TIMEOUT = 60.0  # s, kernel DELETE, JupyterLab SIGTERM, cluster gone

NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"
# Long enough (2 x 1.5 s per server) for the live table to be seen while it runs.
PROGRESS_CELL = """%%casa_parallel --vis "my obs.mms"
import time; time.sleep(1.5)
flagdata(vis=vis, mode='summary')"""
PROMPT_DONE = re.compile(r"^\s*\[\d+\]:\s*$")  # "[ ]:" before, "[*]:" while running


# --------------------------------------------------------------------------- tools


def require_browser_tools() -> Callable[[], Any]:
    """playwright's ``sync_playwright``; fails (never skips) if a tool is missing."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None  # type: ignore[assignment]
        missing.append(
            "playwright is not installed: pip install playwright "
            "(Debian's Chromium is used: no `playwright install`)"
        )
    if not (BIN / "jupyter-lab").is_file():
        missing.append(
            f"JupyterLab is not installed ({BIN / 'jupyter-lab'}): pip install jupyterlab"
        )
    if missing:
        pytest.fail(
            "the browser test needs tools CI installs:\n  " + "\n  ".join(missing),
            pytrace=False,
        )
    return sync_playwright


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install_kernelspec(prefix: Path, env: dict[str, str]) -> None:
    """``casa-kernel install --prefix P -n 3``, as the README tells a user."""
    proc = subprocess.run(
        [str(BIN / "casa-kernel"), "install", "--prefix", str(prefix), "-n", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"casa-kernel install failed:\n{proc.stdout}\n{proc.stderr}"
    assert (prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json").is_file()


def sandbox_env(tmp_path: Path, prefix: Path) -> dict[str, str]:
    """JupyterLab's environment: the prefix's kernels, every Jupyter folder in tmp.

    Also writes the user setting that turns off the "get notified about news?"
    toast, which would otherwise sit over the notebook on fresh settings.
    """
    env = dict(os.environ)
    # The kernelspec's -n 3 must decide the cluster, not the developer's shell.
    for name in ("CASA_KERNEL_NPROCS", "CASA_KERNEL_HOSTFILE", "CASA_KERNEL_MPIEXEC"):
        env.pop(name, None)
    env.pop("JUPYTER_PREFER_ENV_PATH", None)
    dirs = {
        "HOME": tmp_path / "home",
        "IPYTHONDIR": tmp_path / "ipython",
        "JUPYTER_DATA_DIR": tmp_path / "jupyter-data",
        "JUPYTER_CONFIG_DIR": tmp_path / "jupyter-config",
        "JUPYTER_RUNTIME_DIR": tmp_path / "jupyter-runtime",
        "JUPYTERLAB_SETTINGS_DIR": tmp_path / "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": tmp_path / "lab-workspaces",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    env["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
    news = dirs["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    return env


# --------------------------------------------------------------------------- JupyterLab


@dataclass
class Lab:
    """A running JupyterLab server and how to reach it."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}{path}{sep}token={TOKEN}"

    def api(self, method: str, path: str, timeout: float = 30.0) -> Any:
        """One REST call with the token in the header; the decoded JSON (or None)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            headers={"Authorization": f"token {TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM, then wait; SIGKILL only if it did not end in time. Its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
                return None
        return self.proc.returncode


@contextlib.contextmanager
def jupyter_lab(workdir: Path, env: dict[str, str]) -> Iterator[Lab]:
    """JupyterLab serving ``workdir``, ready (``/api/status`` answers); stopped afterwards."""
    port = free_port()
    log = workdir.parent / "jupyter-lab.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "jupyter"),
                "lab",
                "--allow-root",
                "--ip=127.0.0.1",
                "--no-browser",
                f"--port={port}",
                "--ServerApp.port_retries=0",  # fail loudly if the port was taken meanwhile
                f"--IdentityProvider.token={TOKEN}",
            ],
            env=env,
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    lab = Lab(proc, port, log)
    try:
        deadline = time.monotonic() + LAB_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited ({proc.returncode}):\n{lab.log_tail()}")
            try:
                lab.api("GET", "/api/status", timeout=5)
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab not ready in {LAB_START_TIMEOUT} s:\n{lab.log_tail()}")
                time.sleep(0.2)
        yield lab
    finally:
        lab.stop()


def kernel_pid(lab: Lab, kernel_id: str) -> int:
    """The pid of the kernel process JupyterLab started for ``kernel_id``."""
    connection_file = f"kernel-{kernel_id}.json"
    for child in psutil.Process(lab.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(arg.endswith(connection_file) for arg in child.cmdline()):
                return child.pid
    raise AssertionError(f"no child of JupyterLab runs with {connection_file}")


# --------------------------------------------------------------------------- the page


def type_code(page: Any, cell: Any, code: str) -> None:
    """Type ``code`` into a cell's editor, key by key, and check it all arrived."""
    from playwright.sync_api import expect

    editor = cell.locator(".cm-content")
    editor.click()
    for i, line in enumerate(code.split("\n")):
        if i:
            page.keyboard.press("Enter")
        page.keyboard.type(line)
    # CodeMirror renders one element per line; inner_text joins them with newlines.
    expect(editor).to_have_text(code.replace("\n", ""), use_inner_text=False)
    assert editor.inner_text().strip() == code, f"the editor shows {editor.inner_text()!r}"


def run_cell(page: Any, index: int, code: str) -> Any:
    """Type and run (Shift+Enter) the ``index``-th code cell; its locator once it ran."""
    from playwright.sync_api import expect

    cell = page.locator(f"{NOTEBOOK} .jp-CodeCell").nth(index)
    type_code(page, cell, code)
    page.keyboard.press("Shift+Enter")
    expect(cell.locator(".jp-InputArea-prompt")).to_have_text(PROMPT_DONE, timeout=UI_TIMEOUT_MS)
    return cell


def outputs(cell: Any) -> list[str]:
    """The text of each output of a cell, as shown."""
    return [text.strip() for text in cell.locator(".jp-OutputArea-output").all_inner_texts()]


# --------------------------------------------------------------------------- the test


@pytest.mark.timeout(300)  # a backstop: a normal run takes ~20 s
def test_user_runs_casa_parallel_in_jupyterlab(tmp_path: Path, tiny_mms: str) -> None:
    """Launcher tile -> kernel idle -> ``rank`` on both servers -> status -> a Multi-MS
    cell whose live progress table is seen while it runs -> clean shutdown."""
    sync_playwright = require_browser_tools()
    from playwright.sync_api import expect

    started = time.monotonic()
    prefix = tmp_path / "prefix"
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    shutil.copytree(tiny_mms, workdir / "my obs.mms", symlinks=True)
    env = sandbox_env(tmp_path, prefix)
    install_kernelspec(prefix, env)
    screenshot = tmp_path / "jupyterlab.png"
    running_shot = tmp_path / "jupyterlab-progress-running.png"
    pid: int | None = None

    try:
        with jupyter_lab(workdir, env) as lab, sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(UI_TIMEOUT_MS)
                expect.set_options(timeout=UI_TIMEOUT_MS)
                page.goto(lab.url("/lab?reset"))

                tile = page.locator(
                    f'.jp-LauncherCard[data-category="Notebook"][title="{DISPLAY_NAME}"]'
                )
                expect(tile).to_be_visible()
                tile.click()
                # Typing before this is lost (the toolbar turns idle too early).
                expect(
                    page.get_by_role("button", name=f"{DISPLAY_NAME} | Idle", exact=True)
                ).to_be_visible()

                sessions = [
                    s for s in lab.api("GET", "/api/sessions") if s["kernel"]["name"] == KERNEL_NAME
                ]
                assert len(sessions) == 1, f"sessions: {sessions}"
                kernel_id = sessions[0]["kernel"]["id"]
                pid = kernel_pid(lab, kernel_id)

                cell = run_cell(page, 0, "%%casa_parallel\nrank")
                assert "[0, 1]" in outputs(cell), f"the cell shows {outputs(cell)}"

                cell = run_cell(page, 1, "%casa_cluster status")
                table = cell.locator(".jp-OutputArea-output table")
                expect(table).to_be_visible()
                head = [t.strip() for t in table.locator("thead th").all_inner_texts()]
                assert head == ["rank", "host", "pid", "state", "work", "memory"], outputs(cell)
                rows = [
                    [t.strip() for t in row.locator("td").all_inner_texts()]
                    for row in table.locator("tbody tr").all()
                ]
                # CASA's cube client first (a row of its own), then the 2 servers
                assert [r[0] for r in rows] == ["cube client", "0", "1"], f"rows: {rows}"
                assert all(r[1] for r in rows), f"a row without host: {rows}"
                assert [r[3] for r in rows] == ["idle"] * 3, f"rows: {rows}"
                # The table tells the truth: its pids are this kernel's servers.
                cluster_pids = {p.pid for p in cluster_processes(pid)}
                assert {int(r[2]) for r in rows} <= cluster_pids, f"{rows} vs {cluster_pids}"
                assert all(re.search(r"MiB of [\d.]+ GiB$", r[5]) for r in rows), f"rows: {rows}"

                # A long per-sub-MS cell: its live table is on the page while it runs.
                cell = page.locator(f"{NOTEBOOK} .jp-CodeCell").nth(2)
                type_code(page, cell, PROGRESS_CELL)
                page.keyboard.press("Shift+Enter")
                live = cell.locator(".casa-kernel-progress")
                expect(live.locator("span", has_text="busy").first).to_be_visible()
                assert "sub-MS done" in live.inner_text(), live.inner_text()
                page.screenshot(path=str(running_shot))
                expect(cell.locator(".jp-InputArea-prompt")).to_have_text(
                    PROMPT_DONE, timeout=UI_TIMEOUT_MS
                )
                # ONE display, now the summary (not one output per update)
                assert live.count() == 1
                summary = live.inner_text()
                assert re.search(r"4/4 sub-MS in [\d.]+ s; busy: rank 0@", summary), summary
                assert any("flagged" in text for text in outputs(cell)), outputs(cell)

                page.screenshot(path=str(screenshot))
            except BaseException:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(screenshot))
                    print(f"screenshot of the failure: {screenshot}")
                raise
            finally:
                browser.close()

            # Shut down as a user's server would: the kernel through the REST API...
            lab.api("DELETE", f"/api/kernels/{kernel_id}", timeout=SHUTDOWN_TIMEOUT)
            assert kernel_id not in {k["id"] for k in lab.api("GET", "/api/kernels")}
            # ... then JupyterLab itself.
            code = lab.stop()
            assert code is not None, f"JupyterLab ignored SIGTERM:\n{lab.log_tail()}"

        left = wait_gone(pid, timeout=SHUTDOWN_TIMEOUT)
        assert not left, f"cluster processes left behind: {[p.cmdline() for p in left]}"
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    finally:
        if pid is not None:  # never leave a cluster behind on this shared machine
            for proc in cluster_processes(pid):
                with contextlib.suppress(psutil.Error):
                    proc.kill()

    elapsed = time.monotonic() - started
    print(f"browser test: {elapsed:.1f} s; screenshots {running_shot} {screenshot}")
