"""python -m align.compare: `align compare` (align.commands.compare.COMPARE) under its
module's name."""

import sys

from align.commands.compare import COMPARE

if __name__ == "__main__":
    sys.exit(COMPARE.main())
