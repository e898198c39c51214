"""aiomqtt's `Client`, plus the four things the agent needs that aiomqtt 2.x keeps to itself.

1. **PUBACK reason codes.** aiomqtt's `publish()` returns normally when the broker answers with
   an MQTT 5 error code (e.g. 0x87 "Not authorized" from an ACL): its `_on_publish` ignores the
   code. Such a message must stay on disk, so here a rejected publish is never released: its
   `publish()` keeps waiting, `rejected` counts it and `ended` resolves, so the agent ends the
   connection and resends from the lowest queued seq.
2. **CONNACK properties.** The broker's Receive Maximum (the agent's window must not exceed it;
   paho does not enforce it) and the session-present flag.
3. **DISCONNECT with reason 0x04** ("disconnect with will message") for a connection the agent
   gives up on, so the broker publishes the will and its reserved seq is not left unused.
   aiomqtt's `__aexit__` only sends a normal DISCONNECT, which discards the will.
4. **No CONNACK in time.** aiomqtt raises but leaves the TCP connection open; it is closed here
   (with 0x04, as in 3).

Each reaches into aiomqtt's paho callbacks or its paho client (`_client`): pinned to aiomqtt 2.x
(3.x is a rewrite), and `device_agent/tests` fails if a release changes them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Self

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["Link"]

_WILL_DISCONNECT = 0x04  # MQTT 5 "disconnect with will message"


class Link(aiomqtt.Client):
    """One connection to the broker (make a new one for the next), which says why it ended."""

    def __init__(self, *args: Any, connect_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, timeout=connect_timeout_s, **kwargs)
        self._client.connect_timeout = connect_timeout_s  # the TCP/TLS connect; aiomqtt's
        # `timeout` is the wait for CONNACK
        self.receive_maximum: int | None = None
        self.session_present = False
        self.rejected = 0
        self.ended: asyncio.Future[str] = self._loop.create_future()
        """Resolves, with the reason, when this connection is over or must be given up."""

    def end(self, reason: str) -> None:
        if not self.ended.done():
            self.ended.set_result(reason)

    async def __aenter__(self) -> Self:
        try:
            return await super().__aenter__()
        except aiomqtt.MqttError:
            self.abandon()  # no (or a negative) CONNACK: do not leave the socket open
            raise

    def abandon(self) -> None:
        """Send DISCONNECT 0x04: the broker publishes the will. Leaving the `async with` block
        afterwards waits for the socket to close (its own DISCONNECT never goes out)."""
        if self._client.socket() is not None:
            self._client.disconnect(ReasonCode(PacketTypes.DISCONNECT, identifier=_WILL_DISCONNECT))

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        if not reason_code.is_failure:
            self.session_present = bool(flags.session_present)
            receive_max = getattr(properties, "ReceiveMaximum", None)
            self.receive_maximum = int(receive_max) if receive_max else None
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        if reason_code.is_failure:
            # Not passed on: aiomqtt would wake the publisher as if the broker had taken it.
            self.rejected += 1
            self.end(f"PUBACK {reason_code} (mid {mid})")
            return
        super()._on_publish(client, userdata, mid, reason_code, properties)
