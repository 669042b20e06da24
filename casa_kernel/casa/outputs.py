"""What a CASA task call writes: its outputs, removed when the call fails (no
half output that looks valid), the disk space they need (refused before the
task writes what cannot fit), and a full disk said as such when one fills
while it writes.

casacore writing a table on a full disk throws from a destructor: the process
aborts ("terminate called ... No space left on device"). Servers may abort
(they are replaced, and their last words become the error); the kernel must
not, so the writes of a parallel task happen on servers (casampi/tasks.py) and
what would not fit is refused first, here.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from casa_kernel.errors import ServerFailure, SpaceError

FULL_DISK = "No space left on device"


@dataclass
class CallOutputs:
    """What one task call may create, as it was before the call."""

    made: list[str] = field(default_factory=list)  # outputvis paths not there before
    imagename: str = ""
    images_before: set[str] = field(default_factory=set)
    vis: Any = None

    @classmethod
    def of(cls, params: dict[str, Any]) -> CallOutputs:
        made = [p for p in partial_outputs(params.get("outputvis")) if not os.path.lexists(p)]
        image = params.get("imagename")
        image = image if isinstance(image, str) and image.strip() else ""
        return cls(made, image, image_products(image) if image else set(), params.get("vis"))

    @property
    def written(self) -> list[str]:
        """Where the call writes (first: its output MS, else its images)."""
        return self.made or ([self.imagename] if self.imagename else [])

    def check_space(self, taskname: str, params: dict[str, Any]) -> None:
        """Refuse, before anything runs, outputs that cannot fit where they go."""
        if self.made:
            check_output_space(taskname, self.vis, self.made[0])
        if taskname == "tclean" and self.imagename and not self.images_before:
            # (a restart's images exist, and keep their size)
            need = image_bytes(params, cube_channels(params))
            check_image_space(taskname, self.imagename, need)

    def remove(self) -> None:
        """The call failed: remove what it made (what existed before is kept)."""
        new_images = image_products(self.imagename) - self.images_before if self.imagename else ()
        remove_paths([*self.made, *sorted(new_images)])

    def remove_leftovers(self) -> None:
        """The call succeeded: CASA's folder of sub-MS outputs is moved into the
        Multi-MS when all went well; what is left of it was never part of a result."""
        remove_paths([p for p in self.made if p.endswith(".data")])


def partial_outputs(outputvis: Any) -> list[str]:
    """The paths a task writing ``outputvis`` may create, as casatasks 6.7 names them.

    The output MS or Multi-MS (with its sub-MSs in ``<outputvis>/SUBMSS``), its
    flag versions, and ParallelDataHelper's folder of per-sub-MS outputs,
    ``<dir>/<base>.data`` (``<base>`` without a trailing dot), made before any job
    runs and moved into the Multi-MS only at the end.
    """
    if not isinstance(outputvis, str) or not outputvis.strip():
        return []
    path = os.path.abspath(outputvis.rstrip("/"))
    folder, base = os.path.split(path)
    if base.endswith("."):
        base = base[: base.rindex(".")]
    return [path, path + ".flagversions", os.path.join(folder, base + ".data")]


def image_products(imagename: str) -> set[str]:
    """The image products of ``imagename`` on disk (``<imagename>.*``)."""
    return set(glob.glob(glob.escape(imagename) + ".*"))


def remove_paths(paths: Any) -> None:
    for path in paths:
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def full_disk(
    taskname: str, failures: list[ServerFailure], text: str, made: list[str]
) -> SpaceError | None:
    """The task's error when a full disk made it fail: the task, the part (sub-MS,
    assembly, images) and server, the file system and the file CASA could not
    write; None when the failure was something else.

    Called before the outputs are removed: a task that failed while the file
    system of its output has (almost) nothing free failed of that, even where
    CASA's words do not say so (an assertion on a short ``pwrite``, a server's
    abort whose last words were lost).
    """
    said = [f for f in failures if FULL_DISK in f.evalue + f.traceback]
    target = made[0] if made else None
    full_now = target is not None and _nearly_full(target)
    if not said and FULL_DISK not in text and not full_now:
        return None
    failure = (said or failures or [None])[0]
    if failure is not None:
        what = failure.evalue
        where = f" ({failure.part()})" if failure.submms else ""
        if failure.rank is not None:
            where += f" on server rank {failure.rank}" + (
                f" ({failure.host})" if failure.host else ""
            )
    else:
        lines = text.strip().splitlines()
        what, where = (lines[-1] if lines else ""), ""
    written = _written(what) or target or "its output"
    mount = _mount_of(written if os.path.isabs(written) else os.path.abspath(written))
    return SpaceError(
        f"{taskname}{where}: no space left on {mount} writing {written}; "
        f"what it had made was removed ({what.strip()})"
    )


# Less than this free where the output goes, after a failure: the disk was full.
NEARLY_FULL = 1 << 20


def full_disk_death(cause: str, writes: list[str] | tuple[str, ...] = ()) -> bool:
    """A server's death that a full disk caused: its last words say so, or are
    casacore's failed write of a file on a file system with (almost) nothing
    free, or are lost (cut, or mixed with another rank's) while the task call's
    outputs (``writes``) are on one. casacore words that error with ``errno`` as
    it is when the message is made, not as the write left it: seen as "No such
    file or directory" for a write on a full tmpfs."""
    if FULL_DISK in cause:
        return True
    match = re.search(r"write error for file (/\S+?):", cause)
    if match is not None:
        return _nearly_full(match.group(1))
    return any(_nearly_full(path) for path in writes)


def _nearly_full(path: str) -> bool:
    """The file system that holds (or would hold) ``path`` has (almost) nothing free."""
    return _free(path) < NEARLY_FULL


def _free(path: str) -> int:
    """Free bytes on the file system that holds (or would hold) ``path``."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def _written(text: str) -> str:
    """The file casacore could not write, from its message ('' if not named)."""
    match = re.search(r"(?:for file|file) (/\S+?):? No space", text)
    return match.group(1) if match else ""


def _mount_of(path: str) -> str:
    """The mount point of the file system that holds (or will hold) ``path``."""
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def check_output_space(taskname: str, vis: Any, output: str) -> None:
    """Refuse, before anything runs, an output that cannot fit where it goes.

    A full disk in the middle of a parallel task ends in casacore's C++ (the
    output Multi-MS is assembled in the kernel): an AipsError thrown through C++
    aborted the kernel process. The output of split, mstransform or partition
    is at most about the input's size (averaging makes it smaller, so this errs
    on the side of refusing)."""
    if not isinstance(vis, str) or not os.path.isdir(vis):
        return
    folder = os.path.dirname(os.path.abspath(output)) or "."
    if not os.path.isdir(folder):
        return
    free = shutil.disk_usage(folder).free
    need = _du(vis)
    if need > free:
        raise SpaceError(
            f"{taskname}: no space left on {_mount_of(folder)} for {output}: the input "
            f"{vis} takes {need / 2**20:.1f} MB, {free / 2**20:.1f} MB are free; "
            "nothing was written"
        )


# tclean's image products of one image, one float per pixel each: psf, residual,
# model, image, pb, weight, mask, image.pbcor (sumwt is one pixel per plane).
_PRODUCTS = 8
# A margin over the pixels: casacore's table files, tiles not filled, headers.
_IMAGE_MARGIN = 1.25


def image_bytes(params: dict[str, Any], channels: int) -> int:
    """What tclean's images of this call take at most, about (bytes).

    imsize x channels x Stokes planes x Taylor terms x products x 4 bytes.
    ``channels`` is the cube's (1 for 'mfs').
    """
    imsize = params.get("imsize", [100])
    if isinstance(imsize, (int, float)):
        imsize = [imsize]
    imsize = [int(n) for n in imsize] or [100]
    nx, ny = imsize[0], imsize[-1]
    planes = _planes(str(params.get("stokes") or "I"))
    terms = int(params.get("nterms") or 2) if params.get("deconvolver") == "mtmfs" else 1
    # mtmfs keeps psf terms 2*nterms-1 and the others per term
    per_term = _PRODUCTS * terms + (terms - 1)
    return math.ceil(nx * ny * max(1, channels) * planes * per_term * 4 * _IMAGE_MARGIN)


def _planes(stokes: str) -> int:
    """Image planes of tclean's ``stokes``: 'IQUV' 4, 'RRLL' 2, 'pseudoI' 1."""
    if stokes == "pseudoI":
        return 1
    if set(stokes) <= set("RLXY"):  # correlations come in pairs of letters
        return max(1, len(stokes) // 2)
    return max(1, len(stokes))


def cube_channels(params: dict[str, Any]) -> int:
    """A cube's channels: ``nchan``, or (-1: all) every channel of every spw of
    the MS(s), an upper bound; 1 for 'mfs'."""
    if params.get("specmode", "mfs") == "mfs":
        return 1
    nchan = int(params.get("nchan", -1) or -1)
    if nchan > 0:
        return nchan
    vis = params.get("vis")
    total = 0
    for path in [vis] if isinstance(vis, str) else list(vis or []):
        if not isinstance(path, str) or not os.path.isdir(path):
            continue
        from casatools import msmetadata

        md = msmetadata()
        try:
            md.open(path)
            total = max(total, sum(md.nchan(spw) for spw in range(md.nspw())))
        except Exception:
            pass  # the task itself says what is wrong with the MS
        finally:
            md.done()
    return max(1, total)


def check_image_space(taskname: str, imagename: str, need: int) -> None:
    """Refuse a tclean whose images need more than the free space where they go."""
    folder = os.path.dirname(os.path.abspath(imagename)) or "."
    if not os.path.isdir(folder):
        return
    free = shutil.disk_usage(folder).free
    if need > free:
        raise SpaceError(
            f"{taskname}: no space left on {_mount_of(folder)} for the images "
            f"{imagename}.*: they take about {need / 2**20:.1f} MB, "
            f"{free / 2**20:.1f} MB are free; nothing was written"
        )
