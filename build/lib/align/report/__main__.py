"""python -m align.report: `align report` (align.commands.report.REPORT) under its module's name."""

import sys

from align.commands.report import REPORT

if __name__ == "__main__":
    sys.exit(REPORT.main())
