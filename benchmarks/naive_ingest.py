"""The naive pipeline the benchmark compares against: a paho callback that INSERTs each message
on its own (autocommit) and lets paho acknowledge it. No validation beyond JSON parsing."""

from __future__ import annotations

import json
import os
import signal
import threading

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pumpfleet.broker import BrokerOptions

FIELDS = (
    "time",
    "pump_id",
    "seq",
    "delivered_ul_per_h",
    "programmed_rate_ul_per_h",
    "programmed_dose_mcg_per_day",
    "reservoir_ml",
    "reservoir_capacity_ml",
    "low_reservoir_alarm_ml",
    "concentration_mcg_per_ml",
    "battery_pct",
    "battery_eri",
    "pump_state",
    "alarms",
)
"""The v1 telemetry fields a naive pipeline copies into the table (nodered_bench's too)."""
SQL = (
    f"INSERT INTO telemetry ({', '.join(FIELDS)}) "
    f"VALUES ({', '.join(['%s'] * len(FIELDS))}) ON CONFLICT DO NOTHING"
)


def main() -> None:
    db = psycopg.connect(os.environ["PUMPFLEET_DATABASE_URL"], autocommit=True)
    broker = BrokerOptions.from_url(os.environ["PUMPFLEET_MQTT__URL"])  # credentials in it

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        b = json.loads(m.payload)
        db.execute(SQL, tuple(b[f] for f in FIELDS))

    client = broker.paho_client(os.environ["PUMPFLEET_INGEST__CLIENT_ID"])
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect(broker.host, broker.port, clean_start=False, properties=props)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
