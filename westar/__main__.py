"""`python -m westar ...` (same as the `westar` console script; works under torchrun)."""

import sys

from westar.cli import main

sys.exit(main())
