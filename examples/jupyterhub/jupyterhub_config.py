# JupyterHub on a Slurm cluster, each user's notebook server a Slurm job of
# TASKS tasks, and the CASA (MPI) kernel filling that job: the kernel is the
# MPI client on the job's first node, its CASA servers the job's other TASKS-1
# slots (`mpicasa -n TASKS`). Start from this file, change what the comments
# marked SITE say, and run `jupyterhub -f jupyterhub_config.py` as root on the
# login node. See README.md in this folder.
#
# tests/test_jupyterhub.py runs exactly this file (with test-only settings
# layered on top: ports, paths, a test authenticator, the test Slurm's config)
# on a real Slurm, so what is written here is what was tested.

import sys

c = get_config()  # noqa: F821 -- provided by JupyterHub when it reads this file

# SITE: the environment (venv or conda) that holds casa-kernel, CASA, jupyterhub
# and batchspawner, at the SAME path on the login node and on every compute
# node (a shared file system): the notebook server and the kernel run from it
# on the compute nodes. Default: the environment this hub runs from.
ENV = sys.prefix

# SITE: tasks (CPU slots) of each user's job; the kernel takes one, the CASA
# servers the others, so 4 gives 3 servers (one MPI world of size 3).
TASKS = 4

# --- The hub -----------------------------------------------------------------

# SITE: the public address users open (put it behind HTTPS: c.JupyterHub.ssl_cert
# and ssl_key, or a reverse proxy that terminates TLS).
c.JupyterHub.bind_url = "http://:8000"

# The notebook servers run on compute nodes and call the hub's API: it must
# listen where they can reach it, not on 127.0.0.1 (the default). They connect
# to the login node by its host name (JupyterHub's default when hub_ip is
# 0.0.0.0); SITE: set hub_connect_ip if the compute nodes know it by another
# name or address.
c.JupyterHub.hub_ip = "0.0.0.0"

# SITE: who may log in. PAM (JupyterHub's default) logs in Unix users, which is
# what batchspawner needs: the job is submitted as that user and runs in their
# home directory. Nobody may log in until you name the users or a group (or
# allow every Unix user of the login node with allow_all).
c.JupyterHub.authenticator_class = "pam"
# c.Authenticator.allowed_users = {"alice", "bob"}
# c.PAMAuthenticator.allowed_groups = {"astro"}
# c.Authenticator.allow_all = True
# c.Authenticator.admin_users = {"admin"}

# SITE: the hub's state (database, cookie secret) in a folder only root reads.
c.JupyterHub.db_url = "sqlite:////srv/jupyterhub/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "/srv/jupyterhub/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "/srv/jupyterhub/jupyterhub.pid"
c.ConfigurableHTTPProxy.pid_file = "/srv/jupyterhub/jupyterhub-proxy.pid"
# SITE: the proxy, from npm (`npm install -g configurable-http-proxy`); the
# default finds it on the hub's PATH.
# c.ConfigurableHTTPProxy.command = ["/usr/local/bin/configurable-http-proxy"]

# --- Each user's notebook server: a Slurm job ---------------------------------

c.JupyterHub.spawner_class = "batchspawner.SlurmSpawner"

# The server runs as the job's batch step itself, not inside an `srun` step
# (batchspawner's default): a step would hold the job's CPUs, and the step
# that the kernel's `mpiexec` starts for its daemons on the other nodes would
# then wait for them.
c.SlurmSpawner.req_srun = ""
# TASKS tasks (batchspawner's req_nprocs is --cpus-per-task of ONE task, which
# would give the kernel no slots for its servers). SITE: add --nodes=K to
# spread them, --account=A, --constraint=...
c.SlurmSpawner.req_options = f"--ntasks={TASKS}"
# SITE: the partition, the time limit and the memory of the job.
c.SlurmSpawner.req_partition = ""
c.SlurmSpawner.req_runtime = "8:00:00"
c.SlurmSpawner.req_memory = ""

# Absolute paths: JupyterHub passes no PATH of its own to the job, and the
# compute node's login PATH does not know the environment.
c.Spawner.cmd = [f"{ENV}/bin/jupyterhub-singleuser"]
c.SlurmSpawner.batchspawner_singleuser_cmd = f"{ENV}/bin/batchspawner-singleuser"
# The kernel's environment comes from the job (SLURM_JOB_ID, SLURM_JOB_NODELIST,
# SLURM_TASKS_PER_NODE: that is how it fills the job) plus these: the
# environment's bin first, then the system's, where the Slurm commands are (the
# hub also runs `sbatch` with this environment, and the kernel's `mpiexec`
# calls `srun` to start its daemons on the job's other nodes).
c.Spawner.environment = {"PATH": f"{ENV}/bin:/usr/local/bin:/usr/bin:/bin"}
c.Spawner.default_url = "/lab"
# A job may wait in the queue: give it time (batchspawner's own default is 300 s).
c.Spawner.start_timeout = 600
# The server's first start on a compute node imports Jupyter from a shared
# file system: slower than on a laptop.
c.Spawner.http_timeout = 120

# The kernel: installed once, for every user, into ENV (not per user):
#     ENV/bin/casa-kernel install --sys-prefix
# Without -n and --hostfile it fills the Slurm job it runs in (see the README's
# HPC section). Its CASA servers are started by `mpiexec` inside the job:
# no ssh between nodes is needed.

# --- THIS TEST MACHINE RUNS AS ROOT (delete this block on a real site) -------
# On a real site the hub runs as root and submits each job AS THE USER with
# batchspawner's default exec_prefix, `sudo -E -u {username}`; here the only
# user is root, so jobs are submitted directly.
c.BatchSpawnerBase.exec_prefix = ""
# jupyterhub-singleuser (Jupyter Server) refuses to run as root without this.
c.Spawner.args = ["--allow-root"]
