"""The servers' stdout/stderr stream (``--IPEngine.out_stream_factory``, see
casa_kernel/cluster/launcher.py's ENGINE_ARGS): what Python writes goes to the cell,
C-level output (fd 1/2) is not captured (CASA's log is relayed instead)."""

from __future__ import annotations

from typing import Any

from ipykernel.iostream import OutStream


class ServerOutStream(OutStream):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["watchfd"] = False
        super().__init__(*args, **kwargs)
