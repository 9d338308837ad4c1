"""`python -m sdlab.server [options]`: the same as `sdlab serve [options]`."""

import sys

from sdlab.server.cli import main

sys.exit(main())
