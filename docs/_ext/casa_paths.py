"""Warn when the prose names a part of casa_kernel that does not exist.

The guide and the README name files (``casa_kernel/casa/rerun.py``) and modules
or objects (``casa_kernel.errors.CasaKernelError``, ``python -m
casa_kernel.preflight.probe``) to send a reader to the code. When the code
moves, such a name goes stale silently; here every one is checked at build time
and a missing one is a warning (an error under ``sphinx-build -W``) naming the
page. Checked: every page's source (``source-read``) and the repository's
README.md. Files included from outside docs/ (BENCHMARKS.md) are not checked.
Executed notebooks are not checked either (their outputs name temporary paths).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# casa_kernel/<path>: a file or folder of the package, relative to the repository
PATH = re.compile(r"(?<![\w./-])casa_kernel(?:/[\w.-]+)+/?")
# casa_kernel.<name>[.<name>...]: a module, or an object of one
DOTTED = re.compile(r"(?<![\w./-])casa_kernel(?:\.[A-Za-z_]\w*)+")
# package folders that live elsewhere in the repository (pyproject's package-dir)
MAPPED = {"casa_kernel/notebooks": "notebooks", "casa_kernel/kernelspec_files": "kernelspec"}


def _path_exists(text: str) -> bool:
    text = text.rstrip("/").rstrip(".")
    for prefix, real in MAPPED.items():
        if text == prefix or text.startswith(prefix + "/"):
            text = real + text[len(prefix) :]
    return (REPO / text).exists()


def _name_exists(text: str) -> bool:
    """``casa_kernel.a.b.C``: the longest importable module, then attributes."""
    parts = text.rstrip(".").split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except (ImportError, ValueError):
            continue
        obj: Any = importlib.import_module(module_name)
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def stale_names(text: str) -> list[str]:
    """The casa_kernel paths and names in ``text`` that do not exist, in order, once each."""
    missing: list[str] = []
    for match in PATH.finditer(text):
        if not _path_exists(match.group()) and match.group() not in missing:
            missing.append(match.group())
    for match in DOTTED.finditer(text):
        if not _name_exists(match.group()) and match.group() not in missing:
            missing.append(match.group())
    return missing


def check_source(app: Sphinx, docname: str, source: list[str]) -> None:
    if docname.startswith(app.config.casa_notebooks_dir + "/"):
        return
    for name in stale_names(source[0]):
        log.warning(f"names {name!r}, which does not exist in casa_kernel", location=docname)


def check_readme(app: Sphinx) -> None:
    readme = REPO / "README.md"
    for name in stale_names(readme.read_text(encoding="utf-8")):
        log.warning(f"README.md names {name!r}, which does not exist in casa_kernel")


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", check_readme)
    app.connect("source-read", check_source)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
