"""Multi-MS helpers: which sub-MSs a Multi-MS references, checked first."""

from __future__ import annotations

import os

from casa_kernel.errors import CasaKernelError


class MeasurementSetError(CasaKernelError, ValueError):
    """A --vis that is missing, not a MeasurementSet, or not a Multi-MS."""


def list_submms(vis: str) -> list[str]:
    """Absolute paths of the sub-MSs of the Multi-MS ``vis``, in CASA's order.

    Every sub-MS must exist: a Multi-MS whose sub-MS folder was moved or lost
    is refused here, naming the missing sub-MS, before any work is sent.
    """
    vis = os.path.abspath(vis)
    if not os.path.exists(vis):
        raise MeasurementSetError(f"--vis {vis}: no such MeasurementSet")
    if not os.path.isfile(os.path.join(vis, "table.dat")):
        raise MeasurementSetError(f"--vis {vis}: not a MeasurementSet (no table.dat)")
    from casatools import ms as mstool

    ms = mstool()
    try:
        if not ms.open(vis):
            raise MeasurementSetError(f"--vis {vis}: CASA cannot open it")
        if not ms.ismultims():
            raise MeasurementSetError(
                f"--vis {vis} is a plain MeasurementSet, not a Multi-MS: make one with "
                f"partition(vis={os.path.basename(vis)!r}, outputvis='....mms', createmms=True)"
            )
        submms = [os.path.abspath(p) for p in ms.getreferencedtables()]
    except RuntimeError as exc:
        raise MeasurementSetError(f"--vis {vis}: {exc}") from None
    finally:
        ms.close()
        ms.done()
    missing = [p for p in submms if not os.path.isfile(os.path.join(p, "table.dat"))]
    if missing:
        raise MeasurementSetError(f"--vis {vis}: sub-MS {missing[0]} is missing")
    return submms
