"""Pure parts of the cluster room: command line, environment, configuration, parsing."""

from __future__ import annotations

import os
import stat

import pytest

from casa_kernel.cluster import (
    ClusterConfig,
    death_cause,
    find_mpiexec,
    mpi_environment,
    mpiexec_args,
)
from casa_kernel.errors import ClusterError, HostfileError, PlacementError
from casa_kernel.hostfile import parse_hostfile, place


def test_mpiexec_args_carry_the_derived_hostfile_and_forwarded_env():
    placement = place(3)
    args = mpiexec_args(placement, "/tmp/x/servers.hostfile", ("--mca", "btl_tcp_if_include", "va"))
    assert args[:2] == ["--hostfile", "/tmp/x/servers.hostfile"]
    assert args[2:4] == ["--bind-to", "none"]
    forwarded = [args[i + 1] for i, a in enumerate(args) if a == "-x"]
    assert {"CASASITECONFIG", "CASA_KERNEL_LOG_DIR", "IPP_CONNECTION_INFO"} <= set(forwarded)
    assert args[-3:] == ["--mca", "btl_tcp_if_include", "va"]


def test_root_variables_only_for_root_and_ofi_off_only_locally(monkeypatch):
    monkeypatch.delenv("OMPI_MCA_btl", raising=False)
    local = place(3)
    remote = place(3, parse_hostfile("orion slots=2\nantares slots=2\n"), "h")
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in mpi_environment(local, as_root=False)
    root_env = mpi_environment(local, as_root=True)
    assert root_env["OMPI_ALLOW_RUN_AS_ROOT"] == root_env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert mpi_environment(local, as_root=False)["OMPI_MCA_btl"] == "^ofi"
    assert "OMPI_MCA_btl" not in mpi_environment(remote, as_root=False)
    monkeypatch.setenv("OMPI_MCA_btl", "tcp,self")  # the user's choice wins
    assert "OMPI_MCA_btl" not in mpi_environment(local, as_root=False)


def test_config_from_env(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=4\n")
    config = ClusterConfig.from_env(
        {
            "CASA_KERNEL_HOSTFILE": str(hostfile),
            "CASA_KERNEL_MPI_ARGS": "--mca btl_tcp_if_include va",
            "CASA_KERNEL_START_TIMEOUT": "30",
            "CASA_KERNEL_CONTROLLER_LOCATION": " head-node ",
        }
    )
    assert config.nservers == 3
    assert config.extra_mpi_args == ("--mca", "btl_tcp_if_include", "va")
    assert config.start_timeout == 30.0
    assert config.controller_location == "head-node"
    assert os.path.isabs(config.mpiexec)
    assert ClusterConfig.from_env({}).nservers == 2  # default N=3


@pytest.mark.parametrize(
    "env, error, words",
    [
        ({"CASA_KERNEL_NPROCS": "four"}, PlacementError, "'four'"),
        ({"CASA_KERNEL_NPROCS": "1"}, PlacementError, "N=1"),
        ({"CASA_KERNEL_START_TIMEOUT": "soon"}, ClusterError, "'soon'"),
        ({"CASA_KERNEL_MPIEXEC": "/no/such/mpiexec"}, ClusterError, "/no/such/mpiexec"),
        ({"CASA_KERNEL_HOSTFILE": "/no/such/hosts"}, HostfileError, "/no/such/hosts"),
    ],
)
def test_bad_configuration_is_refused_naming_the_value(env, error, words):
    with pytest.raises(error, match=None) as info:
        ClusterConfig.from_env(env)
    assert words in str(info.value)


def test_find_mpiexec_refuses_a_file_that_is_not_executable(tmp_path):
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(stat.S_IRUSR | stat.S_IWUSR)
    with pytest.raises(ClusterError, match="not an executable"):
        find_mpiexec(str(fake))
    fake.chmod(0o755)
    assert find_mpiexec(str(fake)) == str(fake)


@pytest.mark.parametrize(
    "output, expected",
    [
        (
            "prterun noticed that process rank 1 with PID 0 on node vm exited on\n"
            "signal 9 (Killed).",
            "server rank 1 on vm died of signal 9 (Killed)",
        ),
        (
            "process rank 3 with PID 77 on node antares exited on signal 11 (Segmentation fault)",
            "server rank 3 on antares died of signal 11 (Segmentation fault)",
        ),
        ("", "a server died (mpiexec ended the MPI job)"),
    ],
)
def test_death_cause_reads_prterun(output, expected):
    assert death_cause(output) == expected
