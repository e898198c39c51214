"""Test tools for the simulator's MQTT tests: a fleet-wide recording subscriber.

Waiting with deadlines and `Received` come from `pumpfleet.testing`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pumpfleet.testing import RecordingSubscriber


class FleetSubscriber(RecordingSubscriber):
    """Records and decodes (with the contract, which must pass) everything on `topic_filter`.

    A persistent session, so what is published while the broker restarts is queued for it.
    """

    def __init__(self, mqtt_url: str, topic_filter: str = "pumps/#") -> None:
        super().__init__(
            mqtt_url, topic_filter, session_expiry_s=600, client_id_prefix="sim-test-sub"
        )


@contextmanager
def fleet_subscriber(mqtt_url: str, topic_filter: str = "pumps/#") -> Iterator[FleetSubscriber]:
    """`mqtt_url` carries a reading account, e.g. a stack's `mqtt_url_for("ingest")`."""
    sub = FleetSubscriber(mqtt_url, topic_filter)
    try:
        yield sub
    finally:
        sub.close()
