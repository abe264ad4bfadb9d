"""Show what a work area holds, or what a pipeline expands to (see README.md)."""

import sys

from vtab.status import main

if __name__ == "__main__":
    sys.exit(main())
