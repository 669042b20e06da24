"""The example notebooks, importable as the package ``casa_kernel.notebooks``.

pyproject.toml maps ``casa_kernel.notebooks`` onto this directory so the
notebooks ship in the wheel and resolve through :mod:`importlib.resources`
(``casa_kernel.cli.demo`` runs ``quickstart.ipynb`` from there). As for
``kernelspec/``, this ``__init__`` is what makes the mapping work in editable
installs: setuptools' editable finder only resolves a remapped package that has one.
"""
