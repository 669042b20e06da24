"""Encryption of the controller's connections: when, how, and how status says it.

Pure. ipyparallel 9 does the work (CurveZMQ): with ``IPController.enable_curve``
the controller makes a fresh key pair at every start, binds every socket as a
CURVE server and writes its public key into the connection files; engines
(through a connection file on a shared folder, :mod:`casa_kernel.cluster.keyfile`, so
the HMAC key never travels in their environment) and the client (through the
client file) then make key pairs of their own and verify the controller's key.
Nothing of it is re-implemented here: this module only decides and names the
switches.

When: whenever the controller listens on more than loopback, that is whenever a
server may run on another host (a hostfile or allocation with another host, or
servers from the batch queue). A cluster on this machine alone keeps its
controller on 127.0.0.1, which no other machine reaches and no unprivileged user
can capture, so it pays no encryption latency unless asked
(``variables.ENCRYPT`` = 1). Set to 0, it turns it off across hosts
too (a trusted network, or measuring it).
"""

from __future__ import annotations

from casa_kernel import variables
from casa_kernel.config.security import encrypt_wanted

# ipyparallel drops the HMAC signature of messages when CURVE is on ("redundant,
# CurveZMQ protects against replays") unless Session.key is configured. But its
# controller accepts ANY client key pair (no ZAP allow-list), so the signature is
# what still keeps out a process that can reach the port without the cluster's
# connection info: keep it (`--secure`: a fresh random key, as without CURVE).
CURVE_CONTROLLER_ARGS = ("--IPController.enable_curve=True", "--secure")


wanted = encrypt_wanted  # decided with the configuration (config/security.py)


def controller_args(encrypted: bool) -> list[str]:
    """What the controller's command line adds for this choice."""
    return list(CURVE_CONTROLLER_ARGS) if encrypted else []


def describe(encrypted: bool, all_local: bool) -> str:
    """The status line's words: what the controller's traffic is."""
    if encrypted:
        return "traffic encrypted (CurveZMQ)"
    if all_local:
        return "traffic not encrypted (loopback only)"
    return f"traffic NOT encrypted ({variables.ENCRYPT}=0)"
