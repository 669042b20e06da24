"""The ``casa-kernel`` command line (``install``, ``demo``, ``check``).

:func:`main` is the console script; :func:`build_parser` returns the argparse
parser (the docs render it). The parser and handlers are in :mod:`.app`, the
headless notebook run of ``casa-kernel demo`` in :mod:`.demo`.
"""

from __future__ import annotations

from casa_kernel.cli.app import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, build_parser, main

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]
