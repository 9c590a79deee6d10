"""python -m align.dump: `align dump` (align.commands.dump.DUMP) under its module's name."""

import sys

from align.commands.dump import DUMP

if __name__ == "__main__":
    sys.exit(DUMP.main())
