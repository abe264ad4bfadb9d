"""Start runners that drain a work area (see README.md)."""

import sys

from vtab.runner import main

if __name__ == "__main__":
    sys.exit(main())
