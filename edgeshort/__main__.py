"""`python -m edgeshort`: the `edgeshort` command, where the console script is not on PATH."""

import sys

from edgeshort.cli import main

sys.exit(main())
