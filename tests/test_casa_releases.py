"""The contract of every supported casatasks release, without installing it.

Each release of casa_kernel/casa/private.py's RELEASES: its casatasks wheel (pure
Python; 6.7.2+ exist for cp312/cp313 only, so pip is asked for Python 3.12) is
fetched ONCE by pip into a cache kept between runs ($XDG_CACHE_HOME/casa-kernel/
wheels; ~2 MB each, ~13 s for all nine here), unzipped, and scanned with the
kernel's own scan (casa/contract.py): every casampi name and command form it uses
must be served by casa_kernel/casampi/. A failure names the release, file:line
and the name. The installed casatasks is checked the same way, from its folder.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from casa_kernel.casa import contract, private
from casa_kernel.casampi import bridge

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "casa-kernel" / "wheels"


def _wheel(release: str) -> Path:
    """casatasks ``release``'s wheel, from the cache or fetched into it by pip."""
    found = sorted(CACHE.glob(f"casatasks-{release}-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    errors = []
    for python in ("3.12", "3.11"):  # the wheels are py3-none-any; any tag will do
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary", ":all:", "--python-version", python,
            "-d", str(CACHE), f"casatasks=={release}",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        found = sorted(CACHE.glob(f"casatasks-{release}-*.whl"))
        if found:
            return found[0]
        errors.append(f"{' '.join(command)}: rc {done.returncode}\n{done.stderr[-2000:]}")
    pytest.fail(f"casatasks {release}: no wheel fetched\n" + "\n".join(errors))


def _source(release: str) -> Path:
    """The unzipped casatasks package of ``release`` (kept beside its wheel)."""
    wheel = _wheel(release)
    root = CACHE / f"casatasks-{release}-src"
    package = root / "casatasks"
    if not (package / "__init__.py").is_file():
        tmp = CACHE / f"casatasks-{release}-src.{os.getpid()}.tmp"
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp, [n for n in zf.namelist() if n.startswith("casatasks/")])
        os.replace(tmp, root)  # never a half-unzipped tree for the next run
    return package


def _check(release: str, package: Path) -> None:
    uses = contract.scan_tree(package)
    problems = contract.problems(uses, bridge.serves)
    assert not problems, f"casatasks {release}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("release", sorted(private.RELEASES, key=private.release_key))
def test_every_casampi_name_of_the_release_is_served(release):
    _check(release, _source(release))


@pytest.mark.second_release
def test_installed_casatasks_every_casampi_name_is_served():
    spec = importlib.util.find_spec("casatasks")
    assert spec is not None and spec.submodule_search_locations
    _check(private.CASATASKS_VERSION, Path(next(iter(spec.submodule_search_locations))))


def test_the_table_is_every_6_6_and_6_7_release_and_the_range_declared():
    """pyproject's range, RELEASES and .ci/run's second release say the same thing."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text()
    for name in ("casatools", "casatasks"):
        assert f'"{name}>={private.OLDEST_READ},<6.8"' in text
    assert {r.rsplit(".", 2)[0] for r in private.RELEASES} == {"6.6", "6.7"}
    assert private.NEWEST_READ == "6.7.6.14"
    # "run end to end here": the default release (the newest this machine's Python
    # 3.11 has wheels for) by the whole suite, the other by .ci/run's second venv
    run_here = sorted(r for r, release in private.RELEASES.items() if release.run_here)
    assert run_here == ["6.6.5.31", "6.7.0.31"]
    assert "\nsecond_release=6.6.5.31\n" in (root / ".ci" / "run").read_text()


def test_the_docs_table_is_the_fences_table():
    """docs/guide/casa-releases.md: one row per release of RELEASES, same Pythons,
    same "run end to end here"."""
    root = Path(__file__).resolve().parents[1]
    rows = {}
    for line in (root / "docs" / "guide" / "casa-releases.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0][:1].isdigit():
            rows[cells[0]] = cells
    assert sorted(rows) == sorted(private.RELEASES)
    for name, release in private.RELEASES.items():
        _, pythons, scanned, run_here = rows[name]
        assert (pythons, scanned) == (release.pythons, "yes"), name
        assert run_here.startswith("yes" if release.run_here else "no"), name
