"""Sphinx configuration of the casa-kernel docs.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` in an
environment with ``pip install -e '.[docs]'``. Before Sphinx reads anything:

- ``_ext/casa_notebooks.py`` runs ``notebooks/quickstart.ipynb`` and
  ``notebooks/ngc5921.ipynb`` headless on a real casa-kernel (local clusters of
  3 and 4 processes, ~30-40 s on 2 cores) and writes the executed copies into
  ``tutorial/`` (gitignored); myst-nb renders them as they are
  (``nb_execution_mode = "off"``). A copy is reused while its source notebook is
  unchanged (delete ``docs/tutorial/*.ipynb`` to run them again);
  ``-D casa_notebooks_execute=0`` renders them without outputs, starting nothing.
- ``_ext/casa_reference.py`` writes ``reference/generated/*.md`` from the code:
  each magic's ``--help``, the CLI's argparse help, every ``CASA_KERNEL_*``
  variable, the public API, the import ladder (from tests/unit/test_ladder.py).
- ``_ext/casa_paths.py`` warns (an error under ``-W``) when a page or the README
  names a ``casa_kernel`` file or module that does not exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

from casa_kernel import __version__  # noqa: E402

project = "casa-kernel"
author = "the casa-kernel developers"
copyright = "the casa-kernel developers"
version = release = __version__

extensions = [
    "myst_nb",  # brings myst_parser: Markdown pages and notebooks
    "sphinx.ext.autodoc",
    # reference and paths first: they fail in seconds, the notebooks take minutes
    "casa_reference",
    "casa_paths",
    "casa_notebooks",
]

exclude_patterns = [
    "_build",
    "**.ipynb_checkpoints",
    # written by casa_reference and included by the reference pages, not pages of their own
    "reference/generated",
]

# --- MyST and myst-nb
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # `page.md#a-heading` links, as GitHub's anchors
nb_execution_mode = "off"  # casa_notebooks executed them on a real cluster already
nb_merge_streams = True

# --- the tutorial notebooks: name in notebooks/ -> N (client + servers) to run it on.
# ngc5921 images its cube with CASA's channel parallelism: 2 servers and its cube
# client, as mpicasa -n 3.
casa_notebooks = {"quickstart.ipynb": 3, "ngc5921.ipynb": 3}
casa_notebooks_dir = "tutorial"

# --- autodoc (reference/api)
autodoc_member_order = "bysource"
autodoc_typehints = "description"

# --- HTML
html_theme = "pydata_sphinx_theme"
html_title = f"casa-kernel {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_context = {"default_mode": "light"}
html_static_path = ["_static"]
html_css_files = ["casa-kernel.css"]
# pages without siblings: no empty navigation column beside them
html_sidebars = {"index": [], "explanation/architecture": [], "benchmarks": []}
html_show_sourcelink = False
