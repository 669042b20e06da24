"""The kernel's one cluster: configuration, the current CasaCluster, the watchdog.

A configuration error at kernel start (bad hostfile, N beyond the slots) is
kept and raised by the first thing that needs servers, so the kernel itself
still starts and the user sees the message in the notebook.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from casa_kernel.cluster.lifecycle import CasaCluster, State
from casa_kernel.config.settings import ClusterConfig
from casa_kernel.errors import ClusterError

_RUNNING = (State.STARTING, State.RUNNING, State.REPLACING)
# LOST is active: the next cell that needs servers starts a new cluster
_ACTIVE = (*_RUNNING, State.LOST)


class ClusterSession:
    def __init__(self, env: Mapping[str, str] | None = None, watchdog: Any = None):
        self.env = dict(env or {})
        self.cluster: CasaCluster | None = None
        self.config_error: BaseException | None = None
        self.watchdog = watchdog

    def start(self, config: ClusterConfig | None = None) -> CasaCluster:
        """Start a cluster (in the background) from ``config`` or the environment."""
        if self.cluster is not None and self.cluster.state in _RUNNING:
            raise ClusterError(
                "a cluster is already running: %casa_cluster stop (or restart) first"
            )
        self.config_error = None
        if config is None:
            try:
                config = ClusterConfig.from_env()
            except Exception as exc:
                self.config_error = exc
                raise
        if self.cluster is not None:
            self.cluster.close()
        cluster = CasaCluster(config, env=self.env)
        if self.watchdog is not None:
            cluster.janitor.on_change = self.watchdog.watch
        self.cluster = cluster
        cluster.start()
        return cluster

    def require(self) -> CasaCluster:
        """The running (or starting) cluster, or a clear error saying why not."""
        if self.config_error is not None:
            raise ClusterError(f"the cluster could not be configured: {self.config_error}")
        cluster = self.cluster
        if cluster is None or cluster.state in (State.STOPPED, State.STOPPING):
            raise ClusterError("no cluster is running: %casa_cluster start [-n N]")
        if cluster.state is State.FAILED:
            raise ClusterError(
                f"the cluster failed to start: {cluster.error}\n"
                "fix the cause, then %casa_cluster restart"
            )
        return cluster

    @property
    def active(self) -> bool:
        """True while a cluster is starting or running (CASA tasks go parallel)."""
        return self.cluster is not None and self.cluster.state in _ACTIVE

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
