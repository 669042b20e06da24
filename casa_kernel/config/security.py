"""What the configuration decides about security (pure, but for making the key folder).

Whether the controller's traffic is encrypted (:mod:`casa_kernel.cluster.encryption`
names the switches), and whether and where the servers read their connection
info from a file on a shared folder instead of their environment
(:mod:`casa_kernel.cluster.keyfile` writes it). Here, below the cluster, so the
configuration and the preflight can ask without importing the cluster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from casa_kernel import variables
from casa_kernel.casa.config import state_home
from casa_kernel.errors import ClusterError


def encrypt_wanted(setting: bool | None, all_local: bool) -> bool:
    """Encrypt? ``setting`` is variables.ENCRYPT (None: unset = across hosts only)."""
    return (not all_local) if setting is None else setting


def keyfile_wanted(encrypted: bool, all_local: bool, batch: bool) -> bool:
    """Deliver the connection info by file? Only when encrypted and a server may be
    on another host (on one machine the environment never leaves it)."""
    return encrypted and (batch or not all_local)


def key_base_dir(environ: Mapping[str, str], home: str | None = None) -> str:
    """The folder holding the per-cluster key folders (pure; see cluster/keyfile.py)."""
    configured = environ.get(variables.KEY_DIR, "").strip()
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    return os.path.join(state_home(environ, home), "casa-kernel", "clusters")


def private_key_base(base: str) -> str:
    """Create ``base`` (0700) if needed and check it is ours and owner-only."""
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        st = os.stat(base)
    except OSError as exc:
        raise ClusterError(
            f"cannot create the folder for the servers' connection file {base}: "
            f"{exc.strerror or exc}; set {variables.KEY_DIR} to a folder on a file system "
            "every host of the servers mounts at the same path"
        ) from None
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ClusterError(f"{base} ({variables.KEY_DIR}) belongs to another user")
    if st.st_mode & 0o077:
        os.chmod(base, 0o700)  # made by an older umask: keep others out
    return base
