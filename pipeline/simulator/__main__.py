"""``python -m pipeline.simulator``: the same as ``python -m pipeline simulate``."""

import sys

from .cli import main

sys.exit(main())
