"""``python -m memryx``: the same as the ``memryx`` command."""

import sys

from .cli import main

sys.exit(main())
