"""Session fixtures shared by every test module.

``casa_env`` is autouse: it only sets two environment variables (CASASITECONFIG,
CASA_KERNEL_LOG_DIR) and makes a temp folder, so it costs nothing to modules that
never touch CASA, and it guarantees that whichever test first imports casatools
(in this process, or in a kernel/server it starts) reads the offline site config and
logs into the temp folder, not into ~/.local/state or the current directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def casa_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of :func:`casa_environment`, applied to ``os.environ`` for the session.

    The developer's own CASASITECONFIG is set aside so the packaged site config is
    tested; everything is restored at the end of the session.
    """
    from casa_kernel.casa.config import apply_to_process, casa_environment

    log_dir = tmp_path_factory.mktemp("casa-logs")
    with pytest.MonkeyPatch.context() as mp:
        # CASA writes files into the working directory (rflag's threshold
        # reports, .last files): never into the checkout.
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        mp.delenv("CASASITECONFIG", raising=False)
        env = casa_environment(str(log_dir))
        for name in env:  # registers the old values for restoring
            mp.setenv(name, env[name])
        # Warns if a test module imported casatools at its top, before any fixture:
        # too late for this process (the log-location tests then fail), but still
        # right for the kernels and servers tests start.
        apply_to_process(env)
        yield env


@pytest.fixture(scope="session")
def casa_log_dir(casa_env: dict[str, str]) -> Path:
    """The folder CASA logs into during this session."""
    return Path(casa_env["CASA_KERNEL_LOG_DIR"])


@pytest.fixture(scope="session")
def tiny_ms(casa_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny simulated MS (4 antennas, 2 spw x 4 channels, 2 scans, 96 rows; ~0.2 s).

    Shared by the session: copy it before changing it.
    """
    from casa_kernel.casa.simulate import simulate_ms

    return simulate_ms(tmp_path_factory.mktemp("tiny") / "tiny.ms", size="tiny")


@pytest.fixture(scope="session")
def tiny_mms(tiny_ms: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``tiny_ms`` partitioned into a Multi-MS of 4 sub-MSs (~0.8 s).

    Shared by the session: copy it (``shutil.copytree(..., symlinks=True)``, the
    sub-MSs share subtables through relative links) before changing it.
    """
    from casatasks import partition

    out = str(tmp_path_factory.mktemp("tiny-mms") / "tiny.mms")
    # partition() reports many failures in the log only; the check is the output.
    partition(vis=tiny_ms, outputvis=out, createmms=True, separationaxis="auto", numsubms=4)
    if not os.path.isdir(os.path.join(out, "SUBMSS")):
        raise RuntimeError(f"partition did not create the Multi-MS {out}")
    return out
