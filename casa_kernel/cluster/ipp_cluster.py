"""The ipyparallel Cluster of one CasaCluster: controller arguments, the engine
launcher (one mpiexec here, or one batch job) and its configuration, the key by
file when encrypted across hosts, and ipyparallel's log file."""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from casa_kernel import variables
from casa_kernel.cluster import encryption, keyfile, ports
from casa_kernel.cluster.launcher import CONTROLLER_ARGS, ENGINE_ARGS, CasaEngineSetLauncher
from casa_kernel.config.mpiexec import mpi_environment, running_as_root

if TYPE_CHECKING:
    from casa_kernel.cluster.lifecycle import CasaCluster

log = logging.getLogger("casa_kernel.cluster")
_said = {"root": False}  # things said once per process


def make_ipp_cluster(cluster: CasaCluster, workdir: str, env: dict[str, str]) -> Any:
    """The ipyparallel Cluster: controller on loopback unless servers are remote."""
    import ipyparallel as ipp

    config, placement = cluster.config, cluster.config.placement
    launcher_class: type = CasaEngineSetLauncher
    if config.batch is not None:  # the servers are ONE job of the batch queue
        from casa_kernel.cluster.batch_launcher import LAUNCHERS

        launcher_class = LAUNCHERS[config.batch.system]
    else:
        hostfile = os.path.join(workdir, "servers.hostfile")
        with open(hostfile, "w") as f:
            f.write(placement.server_hostfile_text(config.cube_client))
    as_root = running_as_root()
    if as_root and not _said["root"]:
        _said["root"] = True
        log.warning(
            "running as root: setting OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM) and "
            "PRTE_ALLOW_RUN_AS_ROOT(_CONFIRM) for this kernel's cluster only"
        )
    log_dir = env.get(variables.LOG_DIR) or workdir
    ipp_log = _file_logger(cluster, os.path.join(log_dir, f"casa-kernel-{os.getpid()}-cluster.log"))
    ipp_cluster = ipp.Cluster(
        engine_launcher_class=launcher_class,
        n=config.nranks,
        profile_dir=os.path.join(workdir, "profile"),
        cluster_id=f"casa-kernel-{os.getpid()}",
        controller_ip="127.0.0.1" if placement.is_local else "*",
        controller_location=""
        if placement.is_local
        else (config.controller_location or socket.getfqdn()),
        # across hosts: CurveZMQ on every controller socket (keys fresh each start)
        controller_args=list(CONTROLLER_ARGS)
        + encryption.controller_args(config.encrypted)
        # ports bound later by forked processes: none an outgoing connection may take
        + ports.controller_args("127.0.0.1" if placement.is_local else "*"),
        engine_timeout=int(config.start_timeout),
        # No cluster file: this object is the only handle (the watchdog, not
        # `ipcluster stop`, cleans up after a dead kernel), and a file
        # rewritten by late callbacks would outlive the private folder.
        cluster_file="",
        shutdown_atexit=True,
        log=ipp_log,
    )
    launcher = ipp_cluster.config[launcher_class.__name__]
    launcher.mpi_cmd = [config.mpiexec]
    launcher.extra_mpi_args = list(config.extra_mpi_args)
    # world rank 0 is CASA's cube client, or there is none (casa/role.py); said
    # either way, so a value inherited from the kernel's own environment is not taken
    launcher.environment = {**env, variables.CUBE_CLIENT: "1" if config.cube_client else "0"}
    launcher.engine_args = list(ENGINE_ARGS)
    if keyfile.wanted(config.encrypted, placement.is_local, config.batch is not None):
        # The HMAC key must not travel in IPP_CONNECTION_INFO (see keyfile.py).
        folder = keyfile.make_folder(keyfile.base_dir({**os.environ, **env}))
        cluster.janitor.add_path(folder)
        cluster._engines.url_file = os.path.join(folder, keyfile.FILE_NAME)
        ipp_cluster.send_engines_connection_env = False
        launcher.engine_args += keyfile.engine_args(cluster._engines.url_file)
    else:
        cluster._engines.url_file = None
    if config.batch is not None:
        launcher.job = config.batch
        launcher.note = (
            f"servers of the casa-kernel client pid {os.getpid()} on {socket.gethostname()}; "
            "it cancels this job when it stops"
        )
    else:
        launcher.hostfile = hostfile
        launcher.all_local = placement.is_local
        launcher.output_log = ipp_log.casa_kernel_path
    ipp_cluster.config.LocalControllerLauncher.environment = {
        **env,
        **mpi_environment(placement.is_local, as_root, os.environ),
    }
    return ipp_cluster


def _file_logger(cluster: CasaCluster, path: str) -> Any:
    """ipyparallel's log (launcher output, engine deaths) to a file, not the notebook."""
    logger = logging.getLogger(f"casa_kernel.ipyparallel.{id(cluster)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    close_log(cluster)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.casa_kernel_path = path  # type: ignore[attr-defined]
    return logger


def close_log(cluster: CasaCluster) -> None:
    logger = logging.getLogger(f"casa_kernel.ipyparallel.{id(cluster)}")
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
