"""CasaKernel: an IPython kernel that is the MPI client of a CASA cluster.

On start it prepares CASA for offline use, registers the magics, puts CASA's
tasks in the namespace (as the casa shell does) and starts the cluster in the
background, so the first prompt is not blocked. Shutdown and restart stop the
cluster completely; a watchdog process ends it if the kernel is killed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from typing import Any

from ipykernel.ipkernel import IPythonKernel

from casa_kernel import __version__, variables
from casa_kernel.cluster.watchdog import Watchdog
from casa_kernel.errors import CasaKernelError
from casa_kernel.kernel.magics import CasaMagics
from casa_kernel.kernel.session import ClusterSession

log = logging.getLogger("casa_kernel")

PRELOAD_JOIN_TIMEOUT = 60.0  # s: CASA's import takes 2-5 s, more on a loaded machine
# What IPython's history keeps of one cell's printed text (see _bound_output_history).
HISTORY_OUTPUT_LIMIT = 64 * 1024


def _give_back_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim). A cell that
    relayed megabytes of servers' output frees them, but glibc keeps the pages: the
    kernel's RSS wandered 40-100 MiB above its level with no Python object holding
    them (measured with tracemalloc: +80 KiB per 20 MB cell, IPython's bounded record)."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0) if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to give back
        pass


def _preload(tasks: Any) -> None:
    try:
        tasks.preload()
    except Exception as exc:  # the first task call imports again and shows the error
        log.error("casa-kernel: loading CASA in the background failed: %r", exc)


class CasaKernel(IPythonKernel):
    implementation = "casa_kernel"
    implementation_version = __version__

    @property
    def banner(self) -> str:  # type: ignore[override]
        return (
            f"casa-kernel {__version__}: this kernel is the MPI client of a CASA cluster "
            f"(Python {sys.version.split()[0]}).\n"
            "%casa_cluster status | %%casa_parallel [--vis MMS] | %casa_cluster? for help\n"
        )

    @property
    def kernel_info(self) -> dict[str, Any]:  # type: ignore[override]
        info = super().kernel_info
        info["help_links"] = [
            *info.get("help_links", []),
            {"text": "CASA documentation", "url": "https://casadocs.readthedocs.io"},
        ]
        return info

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # Before any other thread exists: every later load of casatools, in any
        # thread (the preload, a cell's `import casatasks`), then finds numpy
        # imported, which its static initialisers need to avoid a deadlock
        # (see casa_kernel.casa.loading, which imports casatasks).
        import numpy  # noqa: F401

        from casa_kernel.casa import config, logs, tasks
        from casa_kernel.casampi import bridge

        # Settings that cannot be used are said in the first cell (see
        # _say_problems): a kernel that dies before answering kernel_info only
        # shows "kernel died" and a restart loop, naming nothing.
        self._problems: list[str] = []
        # log files of this kernel only: casa-<host>-kernel<pid>-client/rank<R>.log
        try:
            log_dir = config.default_log_dir()
        except CasaKernelError as exc:
            log_dir = config.default_log_dir(use_setting=False)
            self._problems.append(f"{exc}; CASA's logs go to {log_dir}")
        logs.prune_old_logs(log_dir)  # other kernels' files, untouched for a month
        env = config.casa_environment(log_dir, tag=f"kernel{os.getpid()}")
        config.apply_to_process(env)
        self.cluster_session = ClusterSession(env=env, watchdog=Watchdog())
        # casatasks' parallel helpers look for casampi when they are imported:
        # serve them ours before anything imports casatasks.
        bridge.install(self.cluster_session)
        tasks.inject_tasks(self.shell.user_ns)
        self.shell.register_magics(CasaMagics(self.shell, self.cluster_session))
        self.shell.user_ns["casa_cluster"] = self.cluster_session
        self.shell.set_custom_exc((CasaKernelError,), _show_casa_error)
        try:
            self.cluster_session.start()
        except Exception as exc:
            # Kept by the session and raised in the notebook by the first
            # command that needs servers; the kernel itself still starts.
            log.error("casa-kernel: cluster not started: %s", exc)
            self._problems.append(
                f"the cluster was not started: {exc}\n"
                "fix the kernelspec's setting, then %casa_cluster restart"
            )
        self._check_server_memory()
        self.shell.events.register("pre_run_cell", self._say_problems)
        self.shell.events.register("post_run_cell", self._bound_output_history)
        self._preload: threading.Thread | None = None
        self._preload_lock = threading.Lock()
        if self._preload_wanted():
            # Begins once the first cell ran or the servers are up, whichever is
            # first: the kernel's start and first answer do not share the CPU
            # with CASA's import (~2 CPU-s).
            self.shell.events.register("post_run_cell", self._begin_preload)
            cluster = self.cluster_session.cluster
            if cluster is not None and str(cluster.state) == "starting":
                # start() while starting hands back the running start's future
                cluster.start().add_done_callback(self._begin_preload)
            else:
                self._begin_preload()

    def _say_problems(self, *_: Any) -> None:
        """Print the settings that could not be used, once, in the first cell."""
        problems, self._problems = self._problems, []
        for problem in problems:
            print(f"casa-kernel: {problem}", file=sys.stderr)

    def _bound_output_history(self, result: Any = None) -> None:
        """Keep at most HISTORY_OUTPUT_LIMIT characters of the cell's printed text
        in IPython's history of outputs (IPython 9 keeps all of it, for
        %notebook: a cell relaying 20 MB of servers' output grew the kernel by
        ~20 MiB, every time). The notebook has the text; only that record is cut."""
        outputs = getattr(self.shell.history_manager, "outputs", None)
        count = getattr(result, "execution_count", None)
        if not outputs or count not in outputs:
            return
        room = HISTORY_OUTPUT_LIMIT  # for the whole cell: stdout and stderr entries
        cut = False
        for output in outputs[count]:
            stream = output.bundle.get("stream") if isinstance(output.bundle, dict) else None
            if not isinstance(stream, list):
                continue
            size = sum(len(part) for part in stream)
            if size > room:
                text = "".join(stream)[:room]
                output.bundle["stream"] = [
                    text,
                    f"\n[casa-kernel: {size - len(text)} more characters of this cell's "
                    "output are not kept in the kernel's history]\n",
                ]
                cut = True
            room = max(0, room - size)
        if cut:
            _give_back_freed_memory()

    def _check_server_memory(self) -> None:
        """A bad server memory setting is said in the first cell (the servers then
        take their default share)."""
        from casa_kernel.server.memory import parse_size

        setting = os.environ.get(variables.SERVER_MEMORY, "")
        try:
            parse_size(setting) if setting.strip() else None
        except ValueError as exc:
            self._problems.append(
                f"{variables.SERVER_MEMORY}: {exc}; each server takes its share of its "
                "host's memory instead"
            )

    def _preload_wanted(self) -> bool:
        from casa_kernel.config.settings import env_flag

        try:
            return env_flag(os.environ, variables.PRELOAD, default=True)
        except CasaKernelError as exc:
            log.error("casa-kernel: %s", exc)
            self._problems.append(f"{exc}; CASA is imported at the first task")
            return False

    def _begin_preload(self, *_: Any) -> None:
        """Import CASA in a background thread, so the first task call does not pay
        for it and the prompt is free meanwhile (a cell that calls a task waits
        on Python's import lock until the import is done). Idempotent.

        Not before this point: casatasks' parallel helpers read the bridge when
        they are imported. ``tasks.preload`` imports numpy before casatools, which
        is what keeps this thread from deadlocking against the cluster thread's
        imports (the earlier attempt's hang; see its docstring).
        """
        from casa_kernel.casa import tasks

        with self._preload_lock:
            if self._preload is not None:
                return
            self._preload = threading.Thread(
                target=_preload, args=(tasks,), name="casa-preload", daemon=True
            )
            self._preload.start()

    def do_shutdown(self, restart: bool) -> dict[str, Any]:  # type: ignore[override]
        # A daemon thread stopped mid-import at exit can leave the import lock
        # held for the exit handlers: let the import finish first.
        if self._preload is not None:
            self._preload.join(timeout=PRELOAD_JOIN_TIMEOUT)
        try:
            self.cluster_session.close()
        except Exception as exc:
            log.error("casa-kernel: error while stopping the cluster: %s", exc)
        return super().do_shutdown(restart)


def _show_casa_error(
    shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None
) -> list[str]:
    """Our errors say where (rank, host, sub-MS, file:line) and carry the server's
    trimmed traceback; the kernel-side frames above them would only bury that."""
    stb = [f"\x1b[31m{etype.__name__}\x1b[39m: {value}"]
    shell._showtraceback(etype, value, stb)  # how IPython's handlers display
    return stb
