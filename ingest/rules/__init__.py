"""ingest.rules: domain.md's alert rules over every committed message, as Findings.

Pure logic, no I/O. `RuleEngine.observe(msg)` per message, `tick(now)` for the watchdog; the
alert lifecycle (ingest/alerts/) turns the Findings into alerts. One module per rule family
(`_alarms`, `_flow`, `_reservoir`, `_refill`, `_battery`, `_mri`, `_dose`, `_silence`, `_gap`,
`_notices`); see README.md for each rule, the data it needs and its blind spots.
"""

from ingest.rules._alarms import CRITICAL
from ingest.rules._engine import RuleEngine
from ingest.rules._latch import Latch
from ingest.rules._thresholds import PumpProfile, Thresholds

__all__ = ["CRITICAL", "Latch", "PumpProfile", "RuleEngine", "Thresholds"]
