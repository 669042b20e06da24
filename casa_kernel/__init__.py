"""casa-kernel: a Jupyter kernel that is the MPI client of a CASA cluster.

The public API is small; everything else is an implementation detail.
"""

from __future__ import annotations

from casa_kernel.errors import (
    CasaKernelError,
    ClusterError,
    HostfileError,
    PlacementError,
    PreflightError,
    RemoteError,
    ServerFailure,
    TaskTimeout,
)

__version__ = "0.1.0"

# Heavier pieces load on first use: importing casa_kernel stays cheap and
# never loads ipykernel, ipyparallel or CASA.
_LAZY = {
    "CasaKernel": "casa_kernel.kernel.kernel",
    "CasaCluster": "casa_kernel.cluster.lifecycle",
    "ClusterConfig": "casa_kernel.config.settings",
    "Dispatcher": "casa_kernel.client.dispatch",
    "simulate_ms": "casa_kernel.casa.simulate",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'casa_kernel' has no attribute {name!r}")


__all__ = [
    "CasaCluster",
    "CasaKernel",
    "CasaKernelError",
    "ClusterConfig",
    "Dispatcher",
    "ClusterError",
    "HostfileError",
    "PlacementError",
    "PreflightError",
    "RemoteError",
    "ServerFailure",
    "TaskTimeout",
    "__version__",
    "simulate_ms",
]
