"""python -m align.dump: `align dump` (align.cli.DUMP) under its module's name."""

import sys

from align.cli import DUMP

if __name__ == "__main__":
    sys.exit(DUMP.main())
