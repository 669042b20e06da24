"""Exact re-runs of CASA tasks that change a sub-MS in place (server side).

When a server dies, OpenMPI ends the whole MPI world and the dispatcher runs the
jobs that died again on new servers (``casa_kernel/client/dispatch.py``). For a job that
reads its sub-MS and writes a new output that is exact. For a job that changes
its sub-MS in place it is exact only if the task gives the same result on the
half-changed sub-MS it finds, i.e. if it rewrites what it changes from inputs it
does not change. Which tasks do that was decided from casatasks 6.7.0.31's
sources; the tasks CASA runs per sub-MS of a Multi-MS are those that build a
``ParallelTaskHelper`` (flagcmd, statwt and the calibration solvers run in the
kernel on the whole Multi-MS and never reach a server):

- ``flagdata`` writing flags (``action='apply'``, any mode but ``summary``):
  rflag, tfcrop, extend, antint, clip (with averaging), quack with
  ``quackincrement`` and ``list`` (any of those) decide from the flags already
  there, so a second run on half-flagged data flags differently. Their FLAG and
  FLAG_ROW columns are saved first, as a flag version of the sub-MS (CASA's own
  flag-version machinery, ``<sub-MS>.flagversions``). ``manual``, ``unflag``,
  ``shadow``, ``elevation`` and plain ``quack`` flag from metadata only: a second
  run sets the same flags (an OR), nothing to keep.
- ``applycal``: CORRECTED_DATA is rewritten from DATA and the calibration tables
  for every selected row, weights are recomputed from SIGMA (``calwt``), and
  ``calflag`` ORs the flags of flagged solutions, which do not depend on the data
  flags: a second run writes the same values (checked on NGC5921: applycal twice
  gives the FLAG, CORRECTED_DATA, WEIGHT, SIGMA of applycal once). Nothing to keep.
- ``setjy`` (MODEL_DATA rewritten from the model), ``clearcal`` (MODEL_DATA and
  CORRECTED_DATA reset), ``delmod`` (model removed), ``initweights`` (weights
  rewritten from SIGMA, channel widths or Tsys): the same. Nothing to keep.

The protocol, per (task call, sub-MS) token (one token per call, made by the
client, the same for every attempt of that call):

1. Before the task, by the marker file of the token:
   - none: make the backup (the sub-MS is as the call found it), then the marker;
   - "saved": an earlier attempt died after the backup: restore it;
   - "done": an earlier attempt FINISHED, but its reply was lost with the MPI
     world (another server died before the reply left): the sub-MS is already
     what the call makes of it, so the stored value is returned and the task is
     not run again (a second rflag on rflagged data would flag more).
2. Run the task; on return the marker becomes "done" with the value (the flag
   version is dropped); on an Exception the backup is dropped (the call fails,
   nothing re-runs it). An interrupt (KeyboardInterrupt, SystemExit: a recovery
   stopping the servers) keeps the backup, since the attempt may be re-run.
3. The kernel calls :func:`forget` once the call has its replies: the marker,
   and the flag-version folder if it was made for the backup, are removed.
   A marker left by a call that never got there (the kernel died) is removed by
   the next backup of that sub-MS: one kernel runs one call at a time on it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from typing import Any

# flagdata modes that set flags from metadata only (antenna, time, geometry):
# running them twice gives the flags of running them once.
_FLAG_MODES_FROM_METADATA = frozenset({"manual", "unflag", "shadow", "elevation"})

_PREFIX = "casa_kernel_rerun_"
_SUFFIX = ".pickle"


def needs_flag_backup(taskname: str, parameters: dict[str, Any]) -> bool:
    """Whether a re-run of this job needs the sub-MS's flags as they were before it."""
    if taskname != "flagdata":
        return False
    mode = parameters.get("mode") or "manual"
    action = parameters.get("action", "apply")
    if mode == "summary" or action != "apply" or parameters.get("writeflags") is False:
        return False
    if mode == "quack" and not parameters.get("quackincrement"):
        return False
    return mode not in _FLAG_MODES_FROM_METADATA


@dataclass
class FlagBackup:
    """A flag version of one sub-MS, named after the call's token, and its marker.

    The marker (written atomically after the version is complete) says what the
    earlier attempts got to; a server killed while saving leaves none, and the
    sub-MS was not changed yet then.
    """

    vis: str
    token: str

    @property
    def version(self) -> str:
        return _PREFIX + self.token

    @property
    def folder(self) -> str:
        return self.vis.rstrip("/") + ".flagversions"

    @property
    def marker(self) -> str:
        return os.path.join(self.folder, self.version + _SUFFIX)

    def state(self) -> dict[str, Any] | None:
        try:
            with open(self.marker, "rb") as f:
                return pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError):
            return None

    def _write(self, state: dict[str, Any]) -> None:
        tmp = self.marker + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(state, f)
        os.replace(tmp, self.marker)  # atomic: complete or absent

    def save(self) -> None:
        created = not os.path.isdir(self.folder)
        self._drop_version()  # a save killed half-way
        for stale in _stale_tokens(self.folder, self.token):
            created |= FlagBackup(self.vis, stale).remove()
        af = _agentflagger()
        try:
            af.open(self.vis)
            if not af.saveflagversion(
                versionname=self.version,
                comment="casa-kernel: flags before a job, restored if its server dies",
                merge="replace",
            ):
                raise RuntimeError(f"could not save the flags of {self.vis}")
        finally:
            af.done()
        self._write({"created_folder": created, "done": False})

    def restore(self) -> None:
        af = _agentflagger()
        try:
            af.open(self.vis)
            if not af.restoreflagversion(versionname=self.version, merge="replace"):
                raise RuntimeError(f"could not restore flag version {self.version} of {self.vis}")
        finally:
            af.done()

    def finished(self, value: Any) -> None:
        """The task returned: keep its value for a re-run whose reply was lost."""
        state = self.state()
        if state is None:  # the kernel forgot the call already (it was interrupted)
            self.remove()
            return
        try:
            self._write({**state, "done": True, "value": value})
        except (pickle.PicklingError, TypeError, AttributeError):
            self._write({**state, "done": True, "value": None})
        self._drop_version()

    def remove(self) -> bool:
        """Remove the backup; whether the flag-version folder was made for it."""
        state = self.state()
        # no marker left (the kernel forgot the call first): an empty folder
        # holds nothing anyway
        created = True if state is None else bool(state.get("created_folder"))
        self._drop_version()
        for path in (self.marker, self.marker + ".tmp"):
            if os.path.exists(path):
                os.remove(path)
        if created and _only_empty_list(self.folder):
            # the folder was made for this backup: leave the sub-MS as CASA would
            shutil.rmtree(self.folder, ignore_errors=True)
        return created

    def _drop_version(self) -> None:
        # By hand rather than agentflagger.deleteflagversion, which logs a WARN
        # (relayed to the notebook) for every version it deletes.
        if _listed(self.folder, self.version):
            _unlist(self.folder, self.version)
        shutil.rmtree(os.path.join(self.folder, "flags." + self.version), ignore_errors=True)


def forget(vis: Any, token: str) -> None:
    """Called by the kernel when a call has its replies: drop what its jobs kept."""
    if isinstance(vis, str) and token:
        backup = FlagBackup(os.path.abspath(vis), token)
        if os.path.exists(backup.marker) or os.path.exists(backup.marker + ".tmp"):
            backup.remove()


def _stale_tokens(folder: str, keep: str) -> list[str]:
    """Tokens of other backups of this sub-MS (left by calls that never ended)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [
        name[len(_PREFIX) : -len(_SUFFIX)]
        for name in names
        if name.startswith(_PREFIX)
        and name.endswith(_SUFFIX)
        and name[len(_PREFIX) : -len(_SUFFIX)] != keep
    ]


def _agentflagger() -> Any:
    from casatools import agentflagger

    return agentflagger()


def _version_list(folder: str) -> str:
    return os.path.join(folder, "FLAG_VERSION_LIST")


def _listed(folder: str, version: str) -> bool:
    try:
        with open(_version_list(folder)) as f:
            return any(line.split(" : ")[0].strip() == version for line in f)
    except OSError:
        return False


def _unlist(folder: str, version: str) -> None:
    path = _version_list(folder)
    with open(path) as f:
        lines = [line for line in f if line.split(" : ")[0].strip() != version]
    with open(path, "w") as f:
        f.writelines(lines)


def _only_empty_list(folder: str) -> bool:
    """The flag-version folder holds nothing but an empty version list."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    if any(name != "FLAG_VERSION_LIST" for name in names):
        return False
    path = _version_list(folder)
    if not os.path.exists(path):
        return True
    with open(path) as f:
        return not f.read().strip()


def run_guarded(
    task: Any, taskname: str, parameters: dict[str, Any], token: str | None, where: str
) -> Any:
    """Run ``task(**parameters)`` as one attempt of the call ``token`` (see above)."""
    vis = parameters.get("vis")
    if not (token and isinstance(vis, str) and needs_flag_backup(taskname, parameters)):
        return task(**parameters)
    backup = FlagBackup(os.path.abspath(vis), token)
    state = backup.state()
    if state is not None and state.get("done"):
        print(
            f"casa-kernel: {taskname} had finished on {backup.vis} before the servers were "
            "replaced; its result is kept, not run again",
            file=sys.stderr,
            flush=True,
        )
        return state.get("value")
    if state is not None:
        backup.restore()
        print(
            f"casa-kernel: restored the flags of {backup.vis} as they were before the "
            f"attempt whose server died; running {taskname} again on {where}",
            file=sys.stderr,
            flush=True,
        )
    else:
        backup.save()
    try:
        value = task(**parameters)
    except Exception:
        backup.remove()  # the call fails; nothing runs this job again
        raise
    backup.finished(value)
    return value
