"""A job's worst-classified samples, from its per-sample tables.

    python main_inspect.py JOB_ID [--work_area ./work] [--top 20]
"""

from vtab import cli
from vtab.inspect import main

if __name__ == "__main__":
    cli.run(main)
