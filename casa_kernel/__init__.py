"""casa-kernel: a Jupyter kernel that is the MPI client of a CASA cluster.

The public API is small; everything else is an implementation detail.
"""

from __future__ import annotations

from casa_kernel.errors import (
    CasaKernelError,
    ClusterError,
    HostfileError,
    PlacementError,
    RemoteError,
    ServerFailure,
    TaskTimeout,
)

__version__ = "0.1.0"

__all__ = [
    "CasaKernelError",
    "ClusterError",
    "HostfileError",
    "PlacementError",
    "RemoteError",
    "ServerFailure",
    "TaskTimeout",
    "__version__",
]
