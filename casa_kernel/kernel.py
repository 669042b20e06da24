"""CasaKernel: an IPython kernel that is the MPI client of a CASA cluster.

On start it prepares CASA for offline use, registers the magics, puts CASA's
tasks in the namespace (as the casa shell does) and starts the cluster in the
background, so the first prompt is not blocked. Shutdown and restart stop the
cluster completely; a watchdog process ends it if the kernel is killed.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ipykernel.ipkernel import IPythonKernel

from casa_kernel import __version__
from casa_kernel.cluster import ClusterSession
from casa_kernel.errors import CasaKernelError
from casa_kernel.magics import CasaMagics
from casa_kernel.watchdog import Watchdog

log = logging.getLogger("casa_kernel")


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
        from casa_kernel import bridge
        from casa_kernel.casa import config, tasks

        env = config.casa_environment(config.default_log_dir())
        config.apply_to_process(env)
        self.cluster_session = ClusterSession(env=env, watchdog=Watchdog())
        # casatasks' parallel helpers look for casampi when they are imported:
        # serve them ours before anything imports casatasks.
        bridge.install(self.cluster_session)
        tasks.inject_tasks(self.shell.user_ns)
        self.shell.register_magics(CasaMagics(self.shell, self.cluster_session))
        self.shell.user_ns["casa_cluster"] = self.cluster_session
        try:
            self.cluster_session.start()
        except CasaKernelError as exc:
            # Kept by the session and raised in the notebook by the first
            # command that needs servers; the kernel itself still starts.
            log.error("casa-kernel: cluster not started: %s", exc)

    def do_shutdown(self, restart: bool) -> dict[str, Any]:  # type: ignore[override]
        try:
            self.cluster_session.close()
        except Exception as exc:
            log.error("casa-kernel: error while stopping the cluster: %s", exc)
        return super().do_shutdown(restart)
