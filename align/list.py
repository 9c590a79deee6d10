"""python -m align.list: `align list` (align.commands.list.LIST) under its module's name."""

import sys

from align.commands.list import LIST

if __name__ == "__main__":
    sys.exit(LIST.main())
