"""ingest.rules: domain.md's alert rules over every committed message, as Findings.

Pure logic, no I/O. `RuleEngine.observe(msg)` per message, `tick(now)` for the watchdog; the
alert lifecycle (ingest/alerts/) turns the Findings into alerts. One module per rule family
(`_alarms`, `_flow`, `_reservoir`, `_refill`, `_battery`, `_mri`, `_dose`, `_silence`, `_gap`,
`_notices`); see README.md for each rule, the data it needs and its blind spots.
"""

from ingest.rules.engine import RuleEngine
from ingest.rules.latch import Latch
from ingest.rules.thresholds import PumpProfile, Thresholds

__all__ = ["Latch", "PumpProfile", "RuleEngine", "Thresholds"]
