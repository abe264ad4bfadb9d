"""Show what a work area holds, or what a pipeline expands to (see README.md)."""


from vtab import cli
from vtab.status import main

if __name__ == "__main__":
    cli.run(main)
