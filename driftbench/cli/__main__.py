import sys

from driftbench.cli import main

sys.exit(main())
