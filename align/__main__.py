"""python -m align: the `align` command."""

import sys

from align.commands import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m align"))
