"""python -m align.golden calibrate CASE: `align calibrate CASE` under its historic name.

The golden files and their parser live in align.zoo.golden."""

import sys

from align.commands import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m align.golden", only=("calibrate",)))
