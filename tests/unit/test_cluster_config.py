"""Pure parts of the cluster room: command line, environment, configuration, parsing."""

from __future__ import annotations

import os
import stat

import pytest

from casa_kernel.cluster.launcher import death_cause, outside_python
from casa_kernel.config.hostfile import parse_hostfile, place
from casa_kernel.config.mpiexec import (
    SLEEP_WHEN_IDLE,
    LaunchSpec,
    mpi_environment,
    mpiexec_command,
)
from casa_kernel.config.settings import ClusterConfig, find_mpiexec
from casa_kernel.errors import ClusterError, HostfileError, PlacementError

SPEC = LaunchSpec("/venv/bin/mpiexec", 2, "/tmp/x/servers.hostfile", local=True)
PROGRAM = ["python", "-m", "ipyparallel.engine", "--mpi"]


@pytest.mark.parametrize(
    "spec, environ, as_root, argv, added",
    [
        (  # the plain local case: hostfile, no binding, only set variables forwarded
            SPEC,
            {"PATH": "/bin"},
            False,
            ["/venv/bin/mpiexec", "-n", "2", "--hostfile", "/tmp/x/servers.hostfile"]
            + ["--bind-to", "none", "-x", "PATH", *PROGRAM],
            {"OMPI_MCA_btl": "^ofi", **SLEEP_WHEN_IDLE},
        ),
        (  # every forwarded variable that is set, in a fixed order; unset ones not
            SPEC,
            {
                "IPP_CONNECTION_INFO": "{}",
                "PATH": "/bin",
                "CASASITECONFIG": "/s.py",
                "CASA_KERNEL_LOG_DIR": "/l",
            },
            False,
            ["/venv/bin/mpiexec", "-n", "2", "--hostfile", "/tmp/x/servers.hostfile"]
            + ["--bind-to", "none", "-x", "PATH", "-x", "CASASITECONFIG"]
            + ["-x", "CASA_KERNEL_LOG_DIR", "-x", "IPP_CONNECTION_INFO", *PROGRAM],
            {"OMPI_MCA_btl": "^ofi", **SLEEP_WHEN_IDLE},
        ),
        (  # site flags go after ours, before the program; remote: ofi left alone
            LaunchSpec("mpiexec", 7, "/h", local=False, extra_args=("--mca", "x", "y")),
            {"LD_LIBRARY_PATH": "/lib"},
            False,
            ["mpiexec", "-n", "7", "--hostfile", "/h", "--bind-to", "none"]
            + ["-x", "LD_LIBRARY_PATH", "--mca", "x", "y", *PROGRAM],
            {},
        ),
        (  # root: the four variables OpenMPI and PRRTE demand; user's btl wins
            SPEC,
            {"OMPI_MCA_btl": "tcp,self"},
            True,
            ["/venv/bin/mpiexec", "-n", "2", "--hostfile", "/tmp/x/servers.hostfile"]
            + ["--bind-to", "none", *PROGRAM],
            {
                "OMPI_ALLOW_RUN_AS_ROOT": "1",
                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "PRTE_ALLOW_RUN_AS_ROOT": "1",
                "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                **SLEEP_WHEN_IDLE,
            },
        ),
    ],
)
def test_mpiexec_command_table(spec, environ, as_root, argv, added):
    assert mpiexec_command(spec, PROGRAM, environ, as_root) == (argv, added)


def test_no_dash_x_for_unset_variables():
    """OpenMPI opens its error text with 'Could not find the environment variable'."""
    argv, _ = mpiexec_command(SPEC, PROGRAM, {}, False)
    assert "-x" not in argv


def test_root_variables_only_for_root_and_ofi_off_only_locally():
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in mpi_environment(True, False, {})
    root_env = mpi_environment(True, True, {})
    assert root_env["OMPI_ALLOW_RUN_AS_ROOT"] == root_env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert mpi_environment(True, False, {})["OMPI_MCA_btl"] == "^ofi"
    assert "OMPI_MCA_btl" not in mpi_environment(False, False, {})
    assert "OMPI_MCA_btl" not in mpi_environment(True, False, {"OMPI_MCA_btl": "tcp,self"})


def test_waiting_ranks_sleep_locally_unless_the_user_says_otherwise():
    """Servers sharing cores: a rank polling in MPI must not take CPU from the
    ones working (BENCHMARKS.md, Imaging)."""
    env = mpi_environment(True, False, {})
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert env["OMPI_MCA_threads_pthreads_yield_strategy"] == "nanosleep"
    assert int(env["OMPI_MCA_threads_pthreads_nanosleep_time"]) > 0
    mine = {"OMPI_MCA_threads_pthreads_yield_strategy": "sched_yield"}
    assert "OMPI_MCA_threads_pthreads_yield_strategy" not in mpi_environment(True, False, mine)
    assert not set(SLEEP_WHEN_IDLE) & set(mpi_environment(False, False, {}))


def test_placement_of_a_hostfile_is_remote():
    assert place(3).is_local
    assert not place(3, parse_hostfile("orion slots=2\nantares slots=2\n"), "h").is_local


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
        (
            "prterun detected that one or more processes exited with non-zero status,\n"
            "thus causing the job to be terminated. The first process to do so was:\n\n"
            "   Process name: [prterun-vm-7972@1,1]\n   Exit code:    3\n",
            "server rank 1 on vm exited with code 3",
        ),
        ("", "a server died (mpiexec ended the MPI job)"),
        (
            # casacore on a full disk: the last words before SIGABRT are kept
            "terminate called after throwing an instance of 'casacore::AipsError'\n"
            "  what():  FilebufIO: write error for file /small/o.ms/table.dat_tmp: "
            "No space left on device\n"
            "prterun noticed that process rank 1 with PID 9 on node vm exited on\n"
            "signal 6 (Aborted).",
            "server rank 1 on vm died of signal 6 (Aborted): casacore::AipsError: "
            "FilebufIO: write error for file /small/o.ms/table.dat_tmp: No space left on device",
        ),
        (
            # two servers abort at once: prterun forwards their lines as they come
            "terminate called after throwing an instance of 'casacore::AipsError'\n"
            "Fatal Python error: Aborted\n\n"
            "Current thread 0x00007f2c3ca7ab80 (most recent call first):\n"
            "  what():  FilebufIO: write error for file /small/o.ms/table.dat_tmp: "
            "No space left on device\n"
            "prterun noticed that process rank 0 with PID 9 on node vm exited on\n"
            "signal 6 (Aborted).",
            "server rank 0 on vm died of signal 6 (Aborted): casacore::AipsError: "
            "FilebufIO: write error for file /small/o.ms/table.dat_tmp: No space left on device",
        ),
    ],
)
def test_death_cause_reads_prterun(output, expected):
    assert death_cause(output, {0: "vm", 1: "vm"}) == expected


def test_death_cause_says_where_a_server_crashed():
    """faulthandler's dump on a crashed server: the crashing thread's innermost frame."""
    output = (
        "Fatal Python error: Segmentation fault\n\n"
        "Thread 0x00007f2c3bcee6c0 (most recent call first):\n"
        '  File "/py/threading.py", line 982 in run\n\n'
        "Current thread 0x00007f2c3ca7ab80 (most recent call first):\n"
        '  File "/casatools/__casac__/imager.py", line 77 in makepsf\n'
        '  File "<casa_parallel cell 3>", line 1 in <module>\n'
        "prterun noticed that process rank 1 with PID 9 on node vm exited on\n"
        "signal 11 (Segmentation fault)."
    )
    assert death_cause(output) == (
        "server rank 1 on vm died of signal 11 (Segmentation fault), "
        "in makepsf (/casatools/__casac__/imager.py:77)"
    )


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            "process rank 0 with PID 5 on node vm exited on signal 9 (Killed)",
            "CASA's cube client on vm died of signal 9 (Killed)",
        ),
        (
            "process rank 2 with PID 7 on node vm exited on signal 9 (Killed)",
            "server rank 1 on vm died of signal 9 (Killed)",
        ),
        (
            "   Process name: [prterun-vm-7972@1,1]\n   Exit code:    3\n",
            "server rank 0 on vm exited with code 3",
        ),
    ],
)
def test_death_cause_with_a_cube_client_names_server_ranks(output, expected):
    """mpiexec names world ranks; world rank 0 is CASA's cube client (casa/role.py)."""
    assert death_cause(output, {-1: "vm", 0: "vm", 1: "vm"}, cube_client=True) == expected


@pytest.mark.parametrize(
    ("environ", "rank", "role"),
    [
        ({"OMPI_COMM_WORLD_RANK": "0", "CASA_KERNEL_CUBE_CLIENT": "1"}, -1, "cubeclient"),
        ({"OMPI_COMM_WORLD_RANK": "3", "CASA_KERNEL_CUBE_CLIENT": "1"}, 2, "rank2"),
        ({"OMPI_COMM_WORLD_RANK": "3", "CASA_KERNEL_CUBE_CLIENT": "0"}, 3, "rank3"),
        ({"PMI_RANK": "1"}, 1, "rank1"),
        ({}, None, "client"),
    ],
)
def test_a_process_knows_its_role_from_mpiexecs_variables(environ, rank, role):
    from casa_kernel.casa.role import role_name, server_rank

    assert server_rank(environ) == rank
    assert role_name(rank) == role


# ---------------------------------------------------------------- one configuration room


def _full_env(tmp_path, **extra: str) -> dict[str, str]:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=5\n")
    env = {
        "CASA_KERNEL_HOSTFILE": str(hostfile),
        "CASA_KERNEL_NPROCS": "4",
        "CASA_KERNEL_MPI_ARGS": "--mca btl_tcp_if_include lo",
        "CASA_KERNEL_START_TIMEOUT": "45",
        "CASA_KERNEL_CONTROLLER_LOCATION": "head-node",
    }
    env.update(extra)
    return env


@pytest.mark.parametrize(
    "attribute, expected",
    [
        ("extra_mpi_args", ("--mca", "btl_tcp_if_include", "lo")),
        ("start_timeout", 45.0),
        ("controller_location", "head-node"),
    ],
)
def test_each_setting_survives_a_new_n(tmp_path, attribute, expected):
    config = ClusterConfig.from_env(_full_env(tmp_path))
    assert config.nservers == 3
    restarted = config.replace(nprocs=3)
    assert restarted.nservers == 2
    assert getattr(restarted, attribute) == expected
    assert restarted.placement.hostfile == str(tmp_path / "hosts")
    assert restarted.mpiexec == config.mpiexec


def test_from_env_overrides_replace_only_what_they_name(tmp_path):
    env = _full_env(tmp_path)
    config = ClusterConfig.from_env(env, nprocs=2)
    assert config.nservers == 1
    assert config.placement.hostfile == str(tmp_path / "hosts")
    assert config.extra_mpi_args == ("--mca", "btl_tcp_if_include", "lo")
    assert config.start_timeout == 45.0
    assert config.controller_location == "head-node"
    # an overridden variable is not even read: a bad N cannot stop `start -n 3`
    assert ClusterConfig.from_env({"CASA_KERNEL_NPROCS": "four"}, nprocs=3).nservers == 2


def test_a_new_hostfile_without_n_fills_its_slots(tmp_path):
    other = tmp_path / "other"
    other.write_text("localhost slots=3\n")
    config = ClusterConfig.from_env(_full_env(tmp_path))
    assert config.replace(hostfile=str(other)).nservers == 2
    assert ClusterConfig.from_env(_full_env(tmp_path), hostfile=str(other)).nservers == 2
    # ... and without a hostfile at all the default N applies again
    assert config.replace(hostfile=None).placement.hostfile is None
    assert config.replace(hostfile=None).nservers == 2


def test_a_replacement_is_validated_again(tmp_path):
    config = ClusterConfig.from_env(_full_env(tmp_path))
    with pytest.raises(PlacementError, match="N=7"):
        config.replace(nprocs=7)  # 5 slots
    with pytest.raises(ClusterError, match="/no/such/mpiexec"):
        config.replace(mpiexec="/no/such/mpiexec")
    with pytest.raises(ClusterError, match="'-1'"):
        ClusterConfig.from_env({"CASA_KERNEL_START_TIMEOUT": "-1"})


def test_preload_setting(tmp_path):
    assert ClusterConfig.from_env({}).preload_casa is True
    config = ClusterConfig.from_env({"CASA_KERNEL_PRELOAD": "0"})
    assert config.preload_casa is False
    assert config.replace(nprocs=4).preload_casa is False  # survives a restart
    assert ClusterConfig.from_env({"CASA_KERNEL_PRELOAD": " Yes "}).preload_casa is True
    with pytest.raises(ClusterError, match="CASA_KERNEL_PRELOAD='maybe'"):
        ClusterConfig.from_env({"CASA_KERNEL_PRELOAD": "maybe"})


def test_outside_python_keeps_only_what_c_code_wrote():
    output = (
        "2026-12-06 23:27:16.531 [IPEngine.0.0] Handling apply_request: cea29cda_1\n"
        "fd2 \ufffd\n"
        "2026-12-06 23:27:14.735 [KernelNanny.0] Nanny watching parent pid 9581.\n"
        "2026-12-06 22:49:18\tSEVERE\tMeasTable::dUTC(Double)\tLeap second table\n"
        "2026-12-06 22:49:18\tINFO1\timager\tsomething\n"
        "\n"
        "hello from fd1 0\n"
    )
    assert outside_python(output) == "fd2 \ufffd\nhello from fd1 0"
    assert outside_python("2026-12-06 23:27:16.547 [IPEngine.1.1] Handling x\n") == ""


@pytest.mark.parametrize(
    "kills, said",
    [
        (1, "server rank 1 on vm was killed by the out-of-memory killer (CASA planned for 0.5 GiB"),
        (
            2,
            "2 of the servers' processes were killed by the out-of-memory killer, "
            "server rank 1 on vm the first mpiexec saw (CASA planned for 0.5 GiB on each",
        ),
        (0, ""),  # the count did not move: another death
    ],
)
def test_an_out_of_memory_death_says_how_many_the_killer_took(tmp_path, kills, said):
    """mpiexec names the first death it saw; when the cgroup's count says the
    killer took more than one process, the cause says so."""
    from types import SimpleNamespace

    from casa_kernel.cluster.launcher import out_of_memory

    (tmp_path / "memory.events").write_text(f"low 0\noom {kills}\noom_kill {3 + kills}\n")
    (tmp_path / "memory.peak").write_text(str(1500 * 2**20))
    (tmp_path / "memory.max").write_text(str(1500 * 2**20))
    server = SimpleNamespace(cgroup=str(tmp_path), oom_kills=3, memory_share=2**29)
    text = out_of_memory("server rank 1 on vm died of signal 9 (Killed)", [server])
    assert text.startswith(said)
    if kills:
        assert "held up to 1500 MiB of its 1500 MiB limit). Use fewer servers per host" in text
