"""pumpfleet's shared core: what every part speaks, so that no part imports another to learn it.

The wire contract (`contract`), the alert rules' vocabulary (`findings`), broker options with
the one URL parser (`broker`), settings, the storage schema and the SQL more than one part runs
(`schema`), the local services (`stack`) and the tests' support (`testing`). The core imports
no part (pyproject.toml's import-linter contracts say which imports are allowed).
"""

from pumpfleet import contract, findings

__all__ = ["contract", "findings"]
__version__ = "0.1.0"
