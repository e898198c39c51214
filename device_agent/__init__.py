"""The device agent: publishes a pump's telemetry, events and status over MQTT (QoS 1) and loses
nothing while offline. See README.md in this folder."""

from pumpfleet.broker import BrokerOptions
from pumpfleet.envelope import Entry, Observation, ObservationKind, build_entry

from ._agent import Agent, AgentStats, client_id
from ._clock import SimClock
from ._driver import ConstantPump, PumpDriver
from ._store import AppendResult, Queued, QueueLimits, Store, StoreError, StoreLocked, Will

__all__ = [
    "Agent",
    "AgentStats",
    "AppendResult",
    "BrokerOptions",
    "ConstantPump",
    "Entry",
    "Observation",
    "ObservationKind",
    "PumpDriver",
    "QueueLimits",
    "Queued",
    "SimClock",
    "Store",
    "StoreError",
    "StoreLocked",
    "Will",
    "build_entry",
    "client_id",
]
