"""Submit vtab runners to SLURM (see README.md, section SLURM)."""

from vtab import cli
from vtab.launch.slurm import main

if __name__ == "__main__":
    cli.run(main)
