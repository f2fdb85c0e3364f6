"""python -m bench: see bench.suite (or --help)."""

import sys

from .suite import main

sys.exit(main())
