"""ingest.rules: domain.md's alert rules over every committed message, as Findings.

Pure logic, no I/O. `RuleEngine.observe(msg)` per message, `tick(now)` for the watchdog; the
alert lifecycle (ingest/alerts/) turns the Findings into alerts. See README.md for each rule.
"""

from ingest.rules.engine import RuleEngine
from ingest.rules.latch import Latch
from ingest.rules.thresholds import PumpProfile, Thresholds

__all__ = ["Latch", "PumpProfile", "RuleEngine", "Thresholds"]
