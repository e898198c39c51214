"""ingest: takes every pump message from the broker into the database, nothing lost or doubled.

The door for the other parts and the tests: the ingester (`Ingester`, its per-pump rate limit
`TokenBuckets`), storage (`prepare`, `write_batch`) and the rule engine (`RuleEngine` with its
`PumpProfile` and `Thresholds`; the simulator runs it on simulated pumps). The alert lifecycle
has its own door, `ingest.alerts`; the rule vocabulary (rule names, priorities, `Finding`) is
the core's, `pumpfleet.findings`.
"""

from ingest._service import Ingester, OnCommit, TokenBuckets
from ingest._store import DeadLetter, WriteResult, prepare, write_batch
from ingest.rules import PumpProfile, RuleEngine, Thresholds

__all__ = [
    "DeadLetter",
    "Ingester",
    "OnCommit",
    "PumpProfile",
    "RuleEngine",
    "Thresholds",
    "TokenBuckets",
    "WriteResult",
    "prepare",
    "write_batch",
]
