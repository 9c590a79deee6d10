"""Entry point of `python -m align.report`."""

import sys

from align.report.cli import main

sys.exit(main())
