"""ingest: takes every pump message from the broker into the database, nothing lost or doubled."""

from ingest.service import Ingester, OnCommit
from ingest.store import DeadLetter, WriteResult, prepare, write_batch

__all__ = ["DeadLetter", "Ingester", "OnCommit", "WriteResult", "prepare", "write_batch"]
