"""Batch allocations (config/allocation.py) and batch job scripts (config/batch.py).

Pure logic, so tables. The Slurm strings marked "ours" were printed by the real
Slurm of tests/slurm_harness.py (``sbatch -N2 -n5``, ``sbatch -n4``,
``sbatch -N2 --ntasks-per-node=2``); the others are the forms the resource
managers document (sbatch(1) gives ``2(x3),1``; LSF's ``LSB_MCPU_HOSTS`` is
``"hostA 2 hostB 2"``; a PBS nodefile repeats a host once per slot).
"""

from __future__ import annotations

import re

import pytest

from casa_kernel.config.allocation import (
    Allocation,
    AllocationError,
    detect,
    expand_hostlist,
    expand_tasks_per_node,
    parse_lsb_mcpu_hosts,
    parse_pbs_nodefile,
    place_in,
)
from casa_kernel.config.batch import BatchJob, _pbs_walltime, batch_script, is_active, parse_status
from casa_kernel.errors import ClusterError, PlacementError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("antares,orion", ["antares", "orion"]),  # ours, sbatch -N2 -n5
        ("orion", ["orion"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("lx[10-12]", ["lx10", "lx11", "lx12"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding: widths grow
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("gpu[1-2],cpu[003-004]", ["gpu1", "gpu2", "cpu003", "cpu004"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("nid[00001-00002],login1", ["nid00001", "nid00002", "login1"]),
        ("a.b.org,c[5]", ["a.b.org", "c5"]),
    ],
)
def test_hostlist(text: str, expected: list[str]) -> None:
    assert expand_hostlist(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("n[1-2", "unbalanced '['"),
        ("n1-2]", "unbalanced ']'"),
        ("n[5-3]", "backwards"),
        ("n[a-b]", "bad range 'a-b'"),
        ("n[[1]]", "nested"),
    ],
)
def test_bad_hostlist(text: str, message: str) -> None:
    with pytest.raises(AllocationError, match=re.escape(message)):
        expand_hostlist(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2,3", [2, 3]),  # ours, sbatch -N2 -n5
        ("2(x2)", [2, 2]),  # ours, sbatch -n4 and -N2 --ntasks-per-node=2
        ("2(x3),1", [2, 2, 2, 1]),  # sbatch(1)
        ("16(x4)", [16] * 4),
        ("1", [1]),
    ],
)
def test_tasks_per_node(text: str, expected: list[int]) -> None:
    assert expand_tasks_per_node(text) == expected


@pytest.mark.parametrize("text", ["2(3)", "x", "2(x)", "-1", "2,,3"])
def test_bad_tasks_per_node(text: str) -> None:
    with pytest.raises(AllocationError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node(text)


PBS_NODEFILE = "cn001\ncn001\ncn001\ncn002\ncn002\n"


@pytest.mark.parametrize(
    ("env", "files", "describe"),
    [
        (  # ours: sbatch -N2 -n5 (the environment of the batch script)
            {
                "SLURM_JOB_ID": "1",
                "SLURM_JOB_NODELIST": "antares,orion",
                "SLURM_TASKS_PER_NODE": "2,3",
                "SLURM_NTASKS": "5",
            },
            {},
            "Slurm job 1: antares 2, orion 3",
        ),
        (
            {
                "SLURM_JOB_ID": "1234",
                "SLURM_JOB_NODELIST": "node[01-04,07]",
                "SLURM_TASKS_PER_NODE": "2(x3),1,4",
            },
            {},
            "Slurm job 1234: node01 2, node02 2, node03 2, node04 1, node07 4",
        ),
        (  # older Slurm names; -N2 without -n: one task a node
            {"SLURM_JOBID": "77", "SLURM_NODELIST": "c[1-2]"},
            {},
            "Slurm job 77: c1 1, c2 1",
        ),
        (
            {"PBS_JOBID": "4242.pbs01", "PBS_NODEFILE": "/var/spool/pbs/aux/4242.pbs01"},
            {"/var/spool/pbs/aux/4242.pbs01": PBS_NODEFILE},
            "PBS job 4242.pbs01: cn001 3, cn002 2",
        ),
        (
            {"LSB_JOBID": "9001", "LSB_MCPU_HOSTS": "hostA 2 hostB 2 hostC 1"},
            {},
            "LSF job 9001: hostA 2, hostB 2, hostC 1",
        ),
    ],
    ids=["slurm-ours", "slurm-ranges", "slurm-old-names", "pbs", "lsf"],
)
def test_detect(env: dict[str, str], files: dict[str, str], describe: str) -> None:
    found = detect(env, read=files.__getitem__)
    assert found is not None
    assert found.describe() == describe


def test_outside_any_job() -> None:
    assert detect({"HOME": "/root", "PATH": "/usr/bin"}) is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "a,b", "SLURM_TASKS_PER_NODE": "1"},
            "Slurm job 5: SLURM_JOB_NODELIST='a,b' names 2 nodes but "
            "SLURM_TASKS_PER_NODE='1' gives 1 counts",
        ),
        ({"LSB_MCPU_HOSTS": "hostA 2 hostB"}, "not 'host count' pairs"),
        ({"LSB_MCPU_HOSTS": "hostA two"}, "bad slot count 'two' for hostA"),
        ({"PBS_JOBID": "7", "PBS_NODEFILE": "/nonexistent/7"}, "PBS job 7: cannot read"),
    ],
)
def test_bad_allocations(env: dict[str, str], message: str) -> None:
    with pytest.raises(AllocationError, match=re.escape(message)):
        detect(env)


def test_pbs_nodefile_order_and_blank_lines() -> None:
    assert parse_pbs_nodefile("b\n\na\nb\n") == (("b", 2), ("a", 1))
    assert parse_lsb_mcpu_hosts("x 1 y 2 x 3") == (("x", 4), ("y", 2))


JOB = Allocation("Slurm", "1234", (("antares", 2), ("orion", 3)))


@pytest.mark.parametrize(
    ("nprocs", "client", "servers"),
    [
        # mpicasa: the client takes one slot of the first node, servers fill the rest
        (None, "antares", ("antares", "orion", "orion", "orion")),
        (5, "antares", ("antares", "orion", "orion", "orion")),
        (2, "antares", ("antares",)),
        (3, "antares", ("antares", "orion")),
        (4, "antares", ("antares", "orion", "orion")),
    ],
)
def test_place_in_allocation(nprocs: int | None, client: str, servers: tuple[str, ...]) -> None:
    placement = place_in(JOB, nprocs)
    assert placement.client_host == client
    assert placement.servers == servers
    assert "Slurm job 1234" in placement.server_hostfile_text()


def test_more_than_the_allocation_names_it() -> None:
    with pytest.raises(PlacementError) as info:
        place_in(JOB, 6)
    assert str(info.value) == (
        "N=6 processes requested but Slurm job 1234 has 5 slots (antares 2, orion 3)"
    )


def test_one_slot_is_not_enough() -> None:
    with pytest.raises(PlacementError, match="Slurm job 9: x 1: only 1 slot"):
        place_in(Allocation("Slurm", "9", (("x", 1),)))


@pytest.mark.parametrize(
    ("hostname", "first"),
    [
        ("antares", "antares"),  # the batch script's node: unchanged
        ("orion", "orion"),  # kernel on another node of the job: its node first
        ("orion.cluster.org", "orion"),
        ("login1", "antares"),  # outside the job: unchanged
    ],
)
def test_client_first(hostname: str, first: str) -> None:
    moved = JOB.client_first(hostname)
    assert moved.hosts[0][0] == first
    assert sorted(moved.hosts) == sorted(JOB.hosts)


# ------------------------------------------------------------------- batch job scripts

LAUNCH = ["/venv/bin/mpiexec", "-n", "16", "--bind-to", "none", "/venv/bin/python", "-m", "e"]


@pytest.mark.parametrize(
    ("job", "directives", "argv"),
    [
        (
            BatchJob("slurm", 16, time="2:00:00"),
            [
                "#SBATCH --job-name=casa-servers",
                "#SBATCH --ntasks=16",
                "#SBATCH --output=/w/out.log",
                "#SBATCH --export=ALL",
                "#SBATCH --time=2:00:00",
            ],
            ["sbatch", "--parsable", "/w/job.sh"],
        ),
        (
            BatchJob(
                "slurm",
                16,
                time="90",
                partition="debug",
                account="astro",
                extra_args=("--nodes=2", "--constraint=ib"),
            ),
            [
                "#SBATCH --job-name=casa-servers",
                "#SBATCH --ntasks=16",
                "#SBATCH --output=/w/out.log",
                "#SBATCH --export=ALL",
                "#SBATCH --time=90",
                "#SBATCH --partition=debug",
                "#SBATCH --account=astro",
            ],
            ["sbatch", "--parsable", "--nodes=2", "--constraint=ib", "/w/job.sh"],
        ),
        (
            BatchJob("pbs", 16, time="2:00:00", partition="workq", account="astro"),
            [
                "#PBS -N casa-servers",
                "#PBS -l select=16:ncpus=1:mpiprocs=1",
                "#PBS -j oe",
                "#PBS -o /w/out.log",
                "#PBS -V",
                "#PBS -l walltime=2:00:00",
                "#PBS -q workq",
                "#PBS -A astro",
            ],
            ["qsub", "/w/job.sh"],
        ),
        (
            BatchJob("pbs", 4, extra_args=("-l", "place=scatter")),
            [
                "#PBS -N casa-servers",
                "#PBS -l select=4:ncpus=1:mpiprocs=1",
                "#PBS -j oe",
                "#PBS -o /w/out.log",
                "#PBS -V",
            ],
            ["qsub", "-l", "place=scatter", "/w/job.sh"],
        ),
    ],
    ids=["slurm-time", "slurm-everything", "pbs", "pbs-extra"],
)
def test_batch_script(job: BatchJob, directives: list[str], argv: list[str]) -> None:
    text, command = batch_script(job, LAUNCH, "/w/job.sh", "/w/out.log", note="for the kernel")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert lines[1 : 1 + len(directives)] == directives
    assert lines[-2] == "# for the kernel"
    nodes = ' --hostfile "$PBS_NODEFILE"' if job.system == "pbs" else ""
    assert lines[-1] == f"exec /venv/bin/mpiexec{nodes} -n 16 --bind-to none /venv/bin/python -m e"
    assert command == argv


@pytest.mark.parametrize("system", ["slurm", "pbs"])
def test_launcher_writes_the_script_ipyparallel_submits(tmp_path, system: str) -> None:
    """The launcher classes (ipyparallel's batch launchers) use batch_script whole."""
    from traitlets.config import Config

    from casa_kernel.cluster.batch_launcher import LAUNCHERS

    cls = LAUNCHERS[system]
    config = Config()
    config[cls.__name__].job = BatchJob(system, 3, time="10")
    config[cls.__name__].mpi_cmd = ["/venv/bin/mpiexec"]
    config[cls.__name__].environment = {"CASA_KERNEL_LOG_DIR": str(tmp_path / "logs")}
    launcher = cls(
        work_dir=str(tmp_path),
        config=config,
        profile_dir=str(tmp_path / "profile"),
        cluster_id="c1",
        engine_set_id="7",
    )
    launcher.write_batch_script(3)
    text = (tmp_path / launcher.batch_file_name).read_text()
    submit = "sbatch" if system == "slurm" else "qsub"
    assert launcher.find_args()[0] == submit
    assert launcher.find_args()[-1] == str(tmp_path / launcher.batch_file_name)
    last = text.splitlines()[-1]
    assert last.startswith("exec /venv/bin/mpiexec")
    # -n: one server per task; the engines are MPI engines of this cluster
    assert " -n 3 --bind-to none " in last
    assert last.endswith("-m ipyparallel.engine --mpi")
    assert launcher.get_env()["IPP_CLUSTER_ID"] == "c1"  # exported to the job (--export=ALL, -V)
    assert (tmp_path / launcher.batch_file_name).stat().st_mode & 0o777 == 0o700
    # the job's output goes to the log folder (shared), not the kernel's private /tmp
    assert launcher.output_file.startswith(str(tmp_path / "logs") + "/")
    assert launcher.output_file in text


@pytest.mark.parametrize(
    ("slurm", "pbs"),
    [("90", "1:30:00"), ("2:00:00", "2:00:00"), ("1-00:00:00", "24:00:00"), ("5:30", "0:05:30")],
)
def test_pbs_walltime(slurm: str, pbs: str) -> None:
    assert _pbs_walltime(slurm) == pbs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"system": "lsf"}, "unknown batch system 'lsf'"),
        ({"nservers": 0}, "at least one server"),
        ({"time": "2 hours"}, "--time '2 hours'"),
        ({"partition": "a b"}, "--partition 'a b': must be one word"),
        ({"account": "x\n#SBATCH --uid=0"}, "--account"),
    ],
)
def test_bad_batch_jobs(kwargs: dict, message: str) -> None:
    fields = {"system": "slurm", "nservers": 4, **kwargs}
    with pytest.raises(ClusterError, match=re.escape(message)):
        BatchJob(**fields)


@pytest.mark.parametrize(
    ("system", "output", "state", "reason", "active"),
    [
        ("slurm", "PENDING|Resources\n", "PENDING", "Resources", True),
        ("slurm", "RUNNING|None\n", "RUNNING", "", True),
        ("slurm", "CANCELLED|None\n", "CANCELLED", "", False),
        ("slurm", "CANCELLED+|None\n", "CANCELLED+", "", False),
        ("slurm", "", "GONE", "", False),
        ("pbs", "Job Id: 7.pbs\n    job_state = Q\n    comment = Not Running\n", "Q", "", True),
        ("pbs", "Job Id: 7.pbs\n    job_state = F\n", "F", "", False),
    ],
)
def test_job_status(system: str, output: str, state: str, reason: str, active: bool) -> None:
    got_state, got_reason = parse_status(system, output)
    assert got_state == state
    if system == "slurm":
        assert got_reason == reason
    assert is_active(system, got_state) is active


# ------------------------------------------------- the cluster configuration reads them

SLURM_ENV = {
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NODELIST": "antares,orion",
    "SLURM_TASKS_PER_NODE": "2,3",
}


def test_config_fills_the_allocation() -> None:
    from casa_kernel.config.settings import ClusterConfig

    config = ClusterConfig.from_env(SLURM_ENV)
    assert config.placement.client_host == "antares"
    assert config.placement.servers == ("antares", "orion", "orion", "orion")
    assert config.layout_source == "Slurm job 1234: antares 2, orion 3"


def test_config_n_takes_the_first_slots_and_more_is_an_error() -> None:
    from casa_kernel.config.settings import ClusterConfig

    config = ClusterConfig.from_env({**SLURM_ENV, "CASA_KERNEL_NPROCS": "3"})
    assert config.placement.servers == ("antares", "orion")
    assert config.layout_source == "Slurm job 1234: antares 2, orion 1"
    with pytest.raises(PlacementError, match=re.escape("Slurm job 1234 has 5 slots")):
        ClusterConfig.from_env({**SLURM_ENV, "CASA_KERNEL_NPROCS": "6"})


def test_config_outside_a_job_and_hostfile_wins(tmp_path) -> None:
    from casa_kernel.config.settings import DEFAULT_NPROCS, ClusterConfig

    config = ClusterConfig.from_env({"PATH": "/usr/bin"})
    assert config.placement.nprocs == DEFAULT_NPROCS
    assert config.layout_source is None
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=4\n")
    config = ClusterConfig.from_env({**SLURM_ENV, "CASA_KERNEL_HOSTFILE": str(hosts)})
    assert config.placement.servers == ("localhost",) * 3
    assert config.layout_source is None


def test_config_of_a_batch_job() -> None:
    from casa_kernel.config.mpiexec import LaunchSpec, mpiexec_command
    from casa_kernel.config.settings import BATCH_START_TIMEOUT, ClusterConfig

    job = BatchJob("slurm", 16, time="2:00:00")
    config = ClusterConfig.from_options(nprocs=17, batch=job)
    assert config.nservers == 16
    assert not config.placement.is_local  # the controller listens on the network
    assert config.start_timeout == BATCH_START_TIMEOUT  # the job may wait in the queue
    assert config.layout_source == "Slurm batch job (16 servers, time 2:00:00)"
    # no hostfile: mpiexec in the job reads the job's allocation
    spec = LaunchSpec(config.mpiexec, config.nservers, None, config.placement.is_local)
    argv, _ = mpiexec_command(spec, ["ipengine"], {}, as_root=False)
    assert argv == [config.mpiexec, "-n", "16", "--bind-to", "none", "ipengine"]


# ------------------------------------------------------ %casa_cluster's batch options


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("start", None),
        (
            "start --slurm -n 17 --time 2:00:00 --partition P --account A "
            "--sbatch-arg=--nodes=2 --sbatch-arg=--exclusive",
            BatchJob("slurm", 16, "2:00:00", "P", "A", ("--nodes=2", "--exclusive")),
        ),
        ("restart --pbs -n 5", BatchJob("pbs", 4)),
        ("start --slurm", BatchJob("slurm", 2)),  # N=3 as everywhere else
    ],
)
def test_magic_batch_options(line: str, expected: BatchJob | None) -> None:
    from IPython.core.magic_arguments import parse_argstring

    from casa_kernel.kernel.magics import CasaMagics, batch_job

    args = parse_argstring(CasaMagics.casa_cluster, line)
    assert batch_job(args) == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("start --slurm --pbs", "choose one of --slurm and --pbs"),
        ("start --time 10", "--time only apply with --slurm or --pbs"),
        ("start --sbatch-arg=-N2", "--sbatch-arg only apply with --slurm or --pbs"),
        ("start --slurm --hostfile h", "--hostfile and --slurm/--pbs"),
        ("start --slurm -n 1", "-n 1: N counts the client too"),
        ("start --slurm --time soon", "--time 'soon'"),
    ],
)
def test_magic_batch_option_errors(line: str, message: str) -> None:
    from IPython.core.error import UsageError
    from IPython.core.magic_arguments import parse_argstring

    from casa_kernel.kernel.magics import CasaMagics, batch_job

    args = parse_argstring(CasaMagics.casa_cluster, line)
    with pytest.raises((UsageError, ClusterError), match=re.escape(message)):
        batch_job(args)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("slurm", BatchJob("slurm", 2)),
        (
            "slurm --time 2:00:00 --partition P --account A --sbatch-arg=--nodes=2",
            BatchJob("slurm", 2, "2:00:00", "P", "A", ("--nodes=2",)),
        ),
        ("pbs --partition workq", BatchJob("pbs", 2, partition="workq")),
    ],
)
def test_batch_spec(spec: str, expected: BatchJob) -> None:
    from casa_kernel.config.batch import parse_batch_spec

    assert parse_batch_spec(spec, 2) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lsf", "CASA_KERNEL_BATCH: argument system: invalid choice: 'lsf'"),
        ("slurm --walltime 5", "CASA_KERNEL_BATCH: unrecognized arguments: --walltime 5"),
        ("slurm --time forever", "--time 'forever'"),
    ],
)
def test_bad_batch_spec(spec: str, message: str) -> None:
    from casa_kernel.config.batch import parse_batch_spec

    with pytest.raises(ClusterError, match=re.escape(message)):
        parse_batch_spec(spec, 2)


def test_config_from_a_kernelspec_with_servers_from_the_queue() -> None:
    from casa_kernel.config.settings import ClusterConfig

    env = {"CASA_KERNEL_NPROCS": "17", "CASA_KERNEL_BATCH": "slurm --time 2:00:00"}
    config = ClusterConfig.from_env(env)
    assert config.batch == BatchJob("slurm", 16, "2:00:00")
    assert ClusterConfig.from_env({"CASA_KERNEL_BATCH": "pbs"}).batch == BatchJob("pbs", 2)


def test_install_records_the_batch_choice(tmp_path, capsys) -> None:
    import json

    from casa_kernel.cli import EXIT_OK, EXIT_USAGE, main

    spec = "slurm --time 2:00:00 --sbatch-arg=--nodes=2"
    assert main(["install", "--prefix", str(tmp_path), "-n", "17", "--batch", spec]) == EXIT_OK
    kernel = tmp_path / "share" / "jupyter" / "kernels" / "casa-mpi" / "kernel.json"
    env = json.loads(kernel.read_text())["env"]
    assert env == {"CASA_KERNEL_NPROCS": "17", "CASA_KERNEL_BATCH": spec}
    assert f"CASA_KERNEL_BATCH={spec}" in capsys.readouterr().out
    # a bad choice fails before anything is written
    other = tmp_path / "other"
    assert main(["install", "--prefix", str(other), "--batch", "slurm --time soon"]) == EXIT_USAGE
    assert not other.exists()


def test_replace_rereads_the_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart inside a job reads the job again (the kernel's environment)."""
    from casa_kernel.config.settings import ClusterConfig

    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    config = ClusterConfig.from_env(SLURM_ENV, nprocs=3)
    assert config.hostfile is None  # the layout's source is no file
    again = config.replace()
    assert again.placement.servers == ("antares", "orion")  # -n 3 kept
    assert again.layout_source == "Slurm job 1234: antares 2, orion 1"
    bigger = config.replace(nprocs=5)
    assert bigger.layout_source == "Slurm job 1234: antares 2, orion 3"
    monkeypatch.setenv("SLURM_JOB_ID", "1235")  # a new job: the restart follows it
    assert config.replace().layout_source == "Slurm job 1235: antares 2, orion 1"


def test_replace_keeps_resizes_or_leaves_the_queue(tmp_path) -> None:
    from casa_kernel.config.settings import BATCH_START_TIMEOUT, ClusterConfig

    job = BatchJob("slurm", 4, time="10")
    config = ClusterConfig.from_options(batch=job)
    assert config.requested_nprocs == 5
    assert config.replace().batch == job  # restart: a new job of the same kind
    resized = config.replace(nprocs=3)
    assert resized.batch == BatchJob("slurm", 2, time="10") and resized.nservers == 2
    other = BatchJob("pbs", 6, partition="workq")
    assert config.replace(nprocs=7, batch=other).batch == other  # --pbs -n 7
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=3\n")
    local = config.replace(hostfile=str(hosts))  # a hostfile places the servers
    assert local.batch is None and local.layout_source is None and local.nservers == 2
    assert local.start_timeout < BATCH_START_TIMEOUT  # not the queue's hour any more
    with pytest.raises(PlacementError, match="N counts the client too"):
        config.replace(nprocs=1)


def test_kernelspec_hostfile_override_leaves_its_queue(tmp_path) -> None:
    from casa_kernel.config.settings import ClusterConfig

    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=3\n")
    env = {"CASA_KERNEL_BATCH": "slurm --time 5"}
    assert ClusterConfig.from_env(env, nprocs=4).batch == BatchJob("slurm", 3, "5")
    assert ClusterConfig.from_env(env, hostfile=str(hosts)).batch is None
