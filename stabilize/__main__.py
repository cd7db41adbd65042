"""``python -m stabilize``: the same command line as the ``stabilize`` script."""

import sys

from .cli import main

sys.exit(main())
