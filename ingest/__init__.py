"""ingest: takes every pump message from the broker into the database, nothing lost or doubled."""

from ingest.service import Ingester, OnCommit
from ingest.store import DeadLetter, WriteResult, write_batch

__all__ = ["DeadLetter", "Ingester", "OnCommit", "WriteResult", "write_batch"]
