"""`python -m meissonic_edge.cli`: the same command as `meissonic-edge`."""

import sys

from meissonic_edge.cli.app import main

sys.exit(main())
