"""python -m hv: the same as run-guest."""

import sys

from .cli import main

sys.exit(main())
