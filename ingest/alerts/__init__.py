"""ingest.alerts: the alert lifecycle (IHE PCD ACM) and its notifications.

Findings from the rules (ingest/rules/) become alerts with one persistent id per (pump, rule),
phases, acknowledgement and history (`Book`); each transition queues its notifications in an
outbox in the same transaction, and `Notifier` delivers them to Alertmanager and a webhook.
`Alerting` wires rules, book and notifier into the ingester. See README.md in this folder.
"""

from ingest.alerts._book import (
    Alert,
    AlertError,
    Book,
    BookPolicy,
    Transition,
    acknowledge,
    load_open,
    resolve,
)
from ingest.alerts._notify import Notifier, render_alertmanager, render_webhook
from ingest.alerts._service import Alerting, AlertingService, RuleEngine, build_engine

__all__ = [
    "Alert",
    "AlertError",
    "Alerting",
    "AlertingService",
    "Book",
    "BookPolicy",
    "Notifier",
    "RuleEngine",
    "Transition",
    "acknowledge",
    "build_engine",
    "load_open",
    "render_alertmanager",
    "render_webhook",
    "resolve",
]
