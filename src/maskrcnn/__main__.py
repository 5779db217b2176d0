"""``python -m maskrcnn ...``: the same command line as the ``maskrcnn`` script."""

import sys

from maskrcnn.cli import main

if __name__ == "__main__":
    sys.exit(main())
