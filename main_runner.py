"""Start runners that drain a work area (see README.md)."""


from vtab import cli
from vtab.launch.local import main

if __name__ == "__main__":
    cli.run(main)
