"""python -m align.compare (see align.cli.compare_main)."""

import sys

from align.cli import compare_main

if __name__ == "__main__":
    sys.exit(compare_main())
