"""python -m align.check (see align.cli.check_main)."""

import sys

from align.cli import check_main

if __name__ == "__main__":
    sys.exit(check_main())
