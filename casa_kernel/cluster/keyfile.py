"""The servers' connection file, on a shared folder, when their traffic is encrypted.

Why: the servers' connection info holds the HMAC key that authenticates a
client to the controller (ipyparallel's controller accepts ANY CurveZMQ client
key, so the signature is what keeps a stranger out). ipyparallel hands it to the
engines in the environment variable ``IPP_CONNECTION_INFO``; across hosts that
variable travels with mpiexec's daemons (prterun -> prted), or with a batch job
(sbatch -> slurmctld -> slurmd), over their own connections, in clear. So when
the controller is encrypted and servers may run on other hosts, the info is
written here instead -- a file 0600 in a folder 0700 on a path every host sees
(the seed's shared file system; by default the user's home) -- and the engines
read it (``IPEngine.url_file``, read once, when an engine starts). The folder is
removed as soon as every server has registered (written again for a
replacement's start), so it exists only while servers start; at stop (the
janitor) and by the watchdog after a killed kernel too. Nothing secret then
crosses the network, and a kernel killed with its watchdog (a batch job
cancelled) leaves no key behind unless killed mid-start.

Where: the folder ``variables.KEY_DIR`` names if set, else ``$XDG_STATE_HOME/casa-kernel/clusters``
(``~/.local/state/casa-kernel/clusters``), beside the CASA logs; one folder per
cluster in it. The preflight checks that this folder is the same on every host.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping
from typing import Any

from casa_kernel.config.security import key_base_dir, keyfile_wanted, private_key_base

FILE_NAME = "engine.json"
# A shared file system may show a new file on another host a little late (NFS
# attribute cache, ~3-60 s): the engines wait this long for it before failing.
WAIT_FOR_FILE = 60.0


# Decided below the cluster (the configuration and the preflight ask too).
wanted = keyfile_wanted
base_dir = key_base_dir
private_base = private_key_base


def make_folder(base: str) -> str:
    """A fresh 0700 folder for one cluster under ``base`` (named for a human)."""
    prefix = f"{socket.gethostname()}-{os.getpid()}-"
    return tempfile.mkdtemp(prefix=prefix, dir=private_base(base))  # 0700


def write(folder: str, info: Mapping[str, Any]) -> str:
    """Write the engines' connection info, 0600 from the start; its path.

    The folder is made again (0700) if :func:`remove` took it. Written under
    another name and renamed, so an engine never reads half a file.
    """
    try:
        os.mkdir(folder, 0o700)  # in our 0700 base: nobody else can take the name
    except FileExistsError:
        pass
    path = os.path.join(folder, FILE_NAME)
    partial = path + ".part"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(info), f)
    os.replace(partial, path)
    return path


def remove(folder: str) -> None:
    """The folder and its file, once every server has read it."""
    shutil.rmtree(folder, ignore_errors=True)


def engine_args(path: str) -> list[str]:
    """What the engines' command line adds to read the file instead of the env."""
    return [f"--IPEngine.url_file={path}", f"--IPEngine.wait_for_url_file={WAIT_FOR_FILE:g}"]
