"""The state of a cluster (lifecycle.py changes it; servers.py and the status read it)."""

from __future__ import annotations

from enum import Enum


class State(Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    REPLACING = "replacing"  # new servers are starting on the same controller
    FAILED = "failed"
    LOST = "lost"  # the controller died or went silent: the next cell starts anew
    STOPPING = "stopping"

    def __str__(self) -> str:
        return self.value
