"""python -m align.check: `align check` (align.commands.check.CHECK) under its module's name."""

import sys

from align.commands.check import CHECK

if __name__ == "__main__":
    sys.exit(CHECK.main())
