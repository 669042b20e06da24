"""The environment that makes CASA from PyPI work offline, in the kernel and on every server.

casatools and casatasks read their configuration once, when ``casaconfig.config`` is
first imported (that is, at the first ``import casatools`` or ``import casatasks``).
It is assembled from, in this order, each one overriding the previous:

1. casaconfig's defaults: measures in ``~/.casa/data``, automatic data updates
   from the network, a GUI logger, and ``casa-<date>.log`` in the current directory;
2. ONE site config file: the absolute path in ``CASASITECONFIG`` if that variable is
   set (a relative or missing path is ignored with a warning on stderr, and then no
   site config at all is read), else ``/opt/casa/casasiteconfig.py``, else
   ``/home/casa/casasiteconfig.py``, else a module ``casasiteconfig`` on ``sys.path``;
3. the user's ``~/.casa/config.py`` (``--configfile`` on the process command line
   names another one, ``--noconfig`` skips it).

:func:`casa_environment` points ``CASASITECONFIG`` at the site config packaged with
casa-kernel (``casa_kernel/resources/casasiteconfig.py``): measures and data from the
``casadata`` wheel, no automatic updates, no GUI, and one log file per process in
the folder ``variables.LOG_DIR`` names (``casa-<host>-client.log`` for the kernel,
``casa-<host>-rank<R>.log`` for the server of MPI rank R).

The user's ``~/.casa/config.py`` is still read after it, in the kernel and on every
server, and whatever it sets wins: a ``measurespath`` without data, automatic updates
(the network), or a ``logfile`` elsewhere all undo part of the offline setup.  A user
config can tell it runs under casa-kernel by that variable being set (``variables.LOG_DIR``).
A ``CASASITECONFIG`` the user set already is kept, since it is how a site points CASA
at its own data; it then replaces the packaged file entirely (its ``logfile`` too).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Mapping
from importlib import resources

from casa_kernel import variables
from casa_kernel.casa.role import role_name
from casa_kernel.errors import SettingError

SITECONFIG_VAR = "CASASITECONFIG"
# Names one kernel's log files (``kernel<pid>``): notebooks running at the same
# time on one machine must not share them, or one relays the other's errors.


def packaged_siteconfig() -> str:
    """Absolute path of the casaconfig site config shipped in ``casa_kernel/resources``."""
    path = os.path.abspath(str(resources.files("casa_kernel") / "resources" / "casasiteconfig.py"))
    if not os.path.isfile(path):
        # casaconfig needs a real file it can open; a zipped install has none.
        raise FileNotFoundError(f"casa-kernel's CASA site config is missing: {path}")
    return path


def _usable_siteconfig(path: str) -> bool:
    """Whether casaconfig would read ``path`` (the test it applies to CASASITECONFIG)."""
    return path.startswith("/") and os.path.isfile(path)


def _private_dir(path: str) -> str:
    """Create ``path`` (mode 0700) if needed and check that it is ours."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if hasattr(os, "getuid") and os.stat(path).st_uid != os.getuid():
        # In a shared folder (the temp dir) someone else could have made it first.
        raise PermissionError(f"log folder {path} belongs to another user")
    return path


def state_home(environ: Mapping[str, str], home: str | None = None) -> str:
    """``$XDG_STATE_HOME``, or ``~/.local/state`` (also for a relative value, which
    the XDG spec says to ignore): where casa-kernel keeps logs and key folders."""
    state = environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(state):
        return state
    return os.path.join(home or os.path.expanduser("~"), ".local", "state")


def cache_home(environ: Mapping[str, str], home: str | None = None) -> str:
    """``$XDG_CACHE_HOME``, or ``~/.cache`` (also for a relative value): where
    casa-kernel keeps what it can compute again (the contract scan of a release)."""
    cache = environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(cache):
        return cache
    return os.path.join(home or os.path.expanduser("~"), ".cache")


def default_log_dir(use_setting: bool = True) -> str:
    """The folder for CASA's log files, created (mode 0700) if missing.

    The folder ``variables.LOG_DIR`` names if set; else ``$XDG_STATE_HOME/casa-kernel/logs``
    (logs are state in the XDG sense: kept across runs, not important enough for
    ``$XDG_DATA_HOME``), ``$XDG_STATE_HOME`` defaulting to ``~/.local/state``.
    If that cannot be created (read-only or missing home), a per-user folder
    under the temp dir.  Never the current directory.
    """
    configured = os.environ.get(variables.LOG_DIR) if use_setting else None
    if configured:
        try:
            return _private_dir(os.path.abspath(os.path.expanduser(configured)))
        except OSError as exc:
            # names the setting: the kernel reports it and falls back
            raise SettingError(
                f"{variables.LOG_DIR}={configured!r} cannot be used as the log folder "
                f"({exc.strerror or exc})"
            ) from exc
    try:
        return _private_dir(os.path.join(state_home(os.environ), "casa-kernel", "logs"))
    except OSError:
        return _private_dir(_temp_log_dir())


def _temp_log_dir() -> str:
    user = str(os.getuid()) if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    # Same name as the site config's fallback, so both agree on where logs go.
    return os.path.join(tempfile.gettempdir(), f"casa-kernel-{user}", "logs")


def logfile_path(
    log_dir: str, rank: int | None = None, host: str | None = None, tag: str | None = None
) -> str:
    """The log file the packaged site config chooses for a process.

    ``rank=None`` is the kernel (``casa-<host>-client.log``), otherwise the server of
    that rank (``casa-<host>-rank<R>.log``) or the cube client (``-cubeclient``); a
    kernel's ``tag`` (``kernel<pid>``, from ``variables.LOG_TAG``) goes before the
    role: ``casa-<host>-<tag>-rank<R>.log``.
    ``host`` defaults to this machine; the short name is used, as in the site
    config.  On a running process ``casatasks.casalog.logfile()`` is the authority.
    """
    host = (host or socket.gethostname()).split(".")[0] or "localhost"
    role = role_name(rank)  # "client", "rank<R>", or "cubeclient" (casa/role.py)
    if tag:
        role = f"{tag}-{role}"
    return os.path.join(log_dir, f"casa-{host}-{role}.log")


def casa_environment(log_dir: str, tag: str | None = None) -> dict[str, str]:
    """Environment variables for the kernel and every server so that CASA runs offline.

    Returns ``CASASITECONFIG`` (the packaged site config, or the user's own if it is
    already set to a file casaconfig can read) and ``variables.LOG_DIR`` (absolute,
    so servers with another working directory agree).  The kernel applies them to
    itself with :func:`apply_to_process` and passes them to mpiexec for the servers.
    Nothing is created here: the site config creates the log folder in each process.
    """
    site = packaged_siteconfig()
    user_site = os.environ.get(SITECONFIG_VAR)
    if user_site and user_site != site:
        if _usable_siteconfig(user_site):
            site = user_site
        else:
            # casaconfig would skip it and read no site config at all, i.e. go
            # online for measures: the packaged one is the better fallback.
            warnings.warn(
                f"{SITECONFIG_VAR}={user_site!r} is not an absolute path to an existing "
                f"file, so casaconfig would ignore it; using casa-kernel's {site}",
                RuntimeWarning,
                stacklevel=2,
            )
    env = {
        SITECONFIG_VAR: site,
        variables.LOG_DIR: os.path.abspath(os.path.expanduser(log_dir)),
    }
    if tag:
        env[variables.LOG_TAG] = tag
    return env


def casa_config_loaded() -> bool:
    """Whether this process has already read CASA's configuration (too late to change it)."""
    return "casaconfig.config" in sys.modules


def apply_to_process(env: Mapping[str, str]) -> bool:
    """Set ``env`` in ``os.environ`` of this process, before casatools is imported.

    Returns False (and warns) if casaconfig already read its configuration in this
    process: the variables are still set, for child processes (mpiexec and the
    servers), but this process keeps the configuration it has.
    """
    too_late = casa_config_loaded()
    os.environ.update(env)
    if too_late:
        warnings.warn(
            "CASA's configuration was already read in this process (casatools or "
            "casatasks imported before casa-kernel set CASASITECONFIG); the new "
            "settings apply to new processes only",
            RuntimeWarning,
            stacklevel=2,
        )
    return not too_late
