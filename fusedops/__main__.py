"""python -m fusedops <command>: the makemore demo's command line (fusedops/makemore/cli.py)."""

import sys

from fusedops.makemore.cli import main

sys.exit(main())
