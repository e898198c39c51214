"""Entry point of one `sim load` worker process: `python -m sim_fleet._load_worker`.

A module of its own so that running it never re-imports a module the package has already
imported (runpy warns about that for `python -m sim_fleet._load`).
"""

import sys

from sim_fleet._load import worker_main

if __name__ == "__main__":
    sys.exit(worker_main())
