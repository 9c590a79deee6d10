"""python -m align.check: `align check` (align.cli.CHECK) under its module's name."""

import sys

from align.cli import CHECK

if __name__ == "__main__":
    sys.exit(CHECK.main())
