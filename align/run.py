"""python -m align.run: `align run` (align.commands.run.RUN) under its module's name."""

import sys

from align.commands.run import RUN

if __name__ == "__main__":
    sys.exit(RUN.main())
