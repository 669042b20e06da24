"""casa-kernel's casaconfig site config: CASA fully offline, one log file per process.

casaconfig (1.5.x) does not import this file: ``casaconfig.config`` reads it and
``exec``s its text, at the first ``import casatools`` / ``import casatasks``, when
the environment variable ``CASASITECONFIG`` holds its absolute path.  What that
means for the code below:

* It runs in a fresh namespace holding only casaconfig's defaults: there is no
  ``__file__``, and only the names casaconfig knows (``measurespath``,
  ``logfile``, ...) are read back; helper names are ignored, private ones
  (leading ``_``) are never looked at.
* If it raises, casaconfig records the traceback in ``config.load_failure()``,
  prints nothing, and applies NONE of the values, so casatools would then look
  for measures in ``~/.casa/data`` and try the network.  Every step that could
  fail is therefore guarded here, and the log folder is created on the spot.
* It sees the process environment (``os.environ``), which is how the kernel
  (``CASA_KERNEL_LOG_DIR``) and mpiexec (``OMPI_COMM_WORLD_RANK`` ...) reach it.
* The user's own ``~/.casa/config.py`` (or ``--configfile``) is exec'd AFTER
  this file, starting from the values set here: anything it sets wins.  It is
  skipped only when ``--noconfig`` is on the process command line.
"""

import os
import socket
import tempfile

# --- data: the casadata wheel, never the network ----------------------------
try:
    import casadata as _casadata

    measurespath = _casadata.datapath
    datapath = [_casadata.datapath]
except ImportError:
    # Keep casaconfig's defaults: casatools will then explain what is missing.
    pass

measures_auto_update = False
data_auto_update = False

# --- no GUI: the kernel and its servers are headless -------------------------
nologger = True
nogui = True


# --- one log file per process, never in the current directory -----------------
def _casa_kernel_logfile():
    # Servers and kernel get the folder from casa-kernel; a process started some
    # other way (a plain `python` with CASASITECONFIG set) gets a per-user temp dir.
    try:
        user = str(os.getuid())
    except AttributeError:  # no getuid() on Windows
        user = os.environ.get("USERNAME", "user")
    candidates = [
        os.environ.get("CASA_KERNEL_LOG_DIR", ""),
        os.path.join(tempfile.gettempdir(), "casa-kernel-" + user, "logs"),
    ]
    log_dir = None
    for candidate in candidates:
        if not candidate:
            continue
        try:
            os.makedirs(candidate, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            log_dir = candidate
            break
    if log_dir is None:
        log_dir = tempfile.mkdtemp(prefix="casa-kernel-logs-")

    host = socket.gethostname().split(".")[0] or "localhost"
    # The servers run under mpiexec, which tells each process its rank; the
    # kernel is not started by mpiexec, so no rank means "client".
    rank = None
    for name in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            rank = os.environ[name]
            break
    role = "client" if rank is None else "rank" + rank
    if rank is not None and os.environ.get("CASA_KERNEL_CUBE_CLIENT") == "1":
        # world rank 0 is CASA's cube client, the servers are 1..N (server/role.py)
        role = "cubeclient" if rank == "0" else "rank" + str(int(rank) - 1)
    # One kernel's files (CASA_KERNEL_LOG_TAG, "kernel<pid>"): notebooks running
    # at the same time must not read each other's servers' errors.
    tag = "".join(c for c in os.environ.get("CASA_KERNEL_LOG_TAG", "") if c.isalnum())
    if tag:
        role = tag + "-" + role
    return os.path.join(os.path.abspath(log_dir), "casa-" + host + "-" + role + ".log")


try:
    logfile = _casa_kernel_logfile()
except Exception:
    # Whatever goes wrong with the log file must not cost us the offline data
    # settings above (casaconfig drops every value of a config that raises):
    # keep casaconfig's default log file name, in the temp dir, not the cwd.
    logfile = os.path.join(tempfile.gettempdir(), os.path.basename(logfile))
