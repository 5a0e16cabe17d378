"""``python -m pipeline.simulator``: the same as ``python -m pipeline simulate``."""

import sys

from .app import main

sys.exit(main())
