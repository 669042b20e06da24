"""``python -m casa_kernel.cli``: the ``casa-kernel`` command."""

import sys

from casa_kernel.cli.app import main

sys.exit(main())
