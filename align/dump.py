"""python -m align.dump (see align.cli.dump_main)."""

import sys

from align.cli import dump_main

if __name__ == "__main__":
    sys.exit(dump_main())
