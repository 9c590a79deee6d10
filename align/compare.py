"""python -m align.compare: `align compare` (align.cli.COMPARE) under its module's name."""

import sys

from align.cli import COMPARE

if __name__ == "__main__":
    sys.exit(COMPARE.main())
