"""``python -m exitwise``: the same command line as ``exitwise``."""

import sys

from exitwise.cli import main

sys.exit(main())
