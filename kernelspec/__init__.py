"""The kernelspec assets (kernel.json template and logos), importable as a package.

pyproject.toml maps ``casa_kernel.kernelspec_files`` onto this directory so the
files ship in the wheel and resolve through :mod:`importlib.resources`. This
``__init__`` is what makes that work in editable installs too: setuptools'
editable finder only resolves a remapped package that has one.
"""
