"""Who may talk to the broker, and about what: mosquitto's dynamic-security plugin.

Anonymous access is off everywhere. The broker knows these accounts:

- one per pump, user name = pump id, with a role of its own (`pump:<id>`) that may publish
  only under `pumps/<id>/`, and read nothing (dynamic security's `%u` substitution is not in
  Debian's mosquitto 2.0.11, hence a role per pump);
- `pumpfleet-ingest`: the ingesters; subscribes to `pumps/#` (shared subscriptions too),
  publishes nothing;
- `pumpfleet-fleet`: a gateway or the simulator speaking for many pumps; publishes under
  `pumps/`, reads nothing. A real deployment gives each pump its own account instead;
- `pumpfleet-admin`: provisioning; may only send dynamic-security commands.

The plugin's file is written once with those service accounts (`config()`); pumps are added,
revoked and listed at run time through its `$CONTROL` API (`Admin`), which also cuts off a
revoked pump that is connected.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from pumpfleet.broker import BrokerOptions

__all__ = [
    "ACCOUNTS",
    "Admin",
    "BrokerAuthError",
    "PumpAccount",
    "config",
    "new_password",
    "pump_role",
    "pump_topic_filter",
]

ACCOUNTS = {
    "admin": "pumpfleet-admin",
    "ingest": "pumpfleet-ingest",
    "fleet": "pumpfleet-fleet",
}
"""Service account -> its broker user name."""

_CONTROL = "$CONTROL/dynamic-security/v1"
_RESPONSE = f"{_CONTROL}/response"
_ITERATIONS = 101  # what mosquitto_ctrl and the plugin use
_TIMEOUT_S = 10.0


class BrokerAuthError(Exception):
    """A provisioning command the broker refused or did not answer; the message says why."""


def new_password() -> str:
    return secrets.token_urlsafe(24)


def pump_role(pump_id: str) -> str:
    return f"pump:{pump_id}"


def pump_topic_filter(pump_id: str) -> str:
    _check_pump_id(pump_id)
    return f"pumps/{pump_id}/#"


def _acl(acltype: str, topic: str, allow: bool = True) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow}


def _hashed(username: str, password: str, roles: Sequence[str]) -> dict[str, Any]:
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": _ITERATIONS,
        "roles": [{"rolename": r} for r in roles],
    }


def config(passwords: Mapping[str, str]) -> dict[str, Any]:
    """The plugin's file: the service accounts of `ACCOUNTS` with these passwords (by account),
    their roles, and deny by default for publishing and subscribing."""
    missing = set(ACCOUNTS) - set(passwords)
    if missing:
        raise ValueError(f"no password for {', '.join(sorted(missing))}")
    roles = [
        {
            "rolename": "pumpfleet-admin",
            "acls": [
                _acl("publishClientSend", f"{_CONTROL}/#"),
                _acl("subscribePattern", f"{_CONTROL}/#"),
                _acl("publishClientReceive", f"{_CONTROL}/#"),
            ],
        },
        {
            "rolename": "pumpfleet-ingest",
            "acls": [
                _acl("subscribePattern", "pumps/#"),
                _acl("subscribePattern", "$share/+/pumps/#"),
                _acl("publishClientReceive", "pumps/#"),
            ],
        },
        {"rolename": "pumpfleet-fleet", "acls": [_acl("publishClientSend", "pumps/#")]},
    ]
    clients = [
        _hashed(ACCOUNTS[account], passwords[account], [f"pumpfleet-{account}"])
        for account in ACCOUNTS
    ]
    return {
        "clients": clients,
        "roles": roles,
        "groups": [],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


@dataclass(frozen=True)
class PumpAccount:
    pump_id: str
    disabled: bool


class Admin:
    """A dynamic-security session as `pumpfleet-admin`: `with Admin(options) as admin:`."""

    def __init__(self, options: BrokerOptions) -> None:
        self.options = options
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"pumpfleet-admin-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        if options.username:
            self._client.username_pw_set(options.username, options.password)
        if options.tls:
            self._client.tls_set_context(options.tls_context())
        self._ready = threading.Event()
        self._connect_rc: Any = None
        self._lock = threading.Lock()
        self._waiting: dict[str, list[dict[str, Any]]] = {}
        self._answered = threading.Condition(self._lock)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def __enter__(self) -> Admin:
        try:
            self._client.connect(self.options.host, self.options.port, keepalive=30)
        except OSError as exc:
            raise BrokerAuthError(
                f"cannot reach the broker at {self.options.url} ({exc}); is it running?"
            ) from None
        self._client.loop_start()
        if not self._ready.wait(_TIMEOUT_S) or self._connect_rc is not None:
            self._client.loop_stop()
            why = self._connect_rc or "no answer"
            raise BrokerAuthError(
                f"the broker at {self.options.url} refused the provisioning account ({why}); "
                "check the admin user name and password (PUMPFLEET_BROKER_ADMIN_URL)"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self._connect_rc = str(rc)
            self._ready.set()
            return
        client.subscribe(_RESPONSE, qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, rcs: Any, props: Any) -> None:
        if any(r.is_failure for r in rcs):
            self._connect_rc = f"subscription to {_RESPONSE}: {rcs[0]}"
        self._ready.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        # The plugin echoes each command's "correlationData" in its response (2.0.11 sets no
        # MQTT 5 correlation property); one request's commands share ours.
        try:
            responses = json.loads(message.payload).get("responses", [])
        except (ValueError, AttributeError):
            return
        corr = next((r.get("correlationData") for r in responses if isinstance(r, dict)), None)
        with self._answered:
            if corr in self._waiting:
                self._waiting[corr] = responses
                self._answered.notify_all()

    def run(self, commands: Iterable[dict[str, Any]], *, allow: Iterable[str] = ()) -> list[dict]:
        """Send commands in one request and return the responses; an error other than one
        listed in `allow` (substrings) raises BrokerAuthError."""
        corr = uuid.uuid4().hex
        cmds = [{**c, "correlationData": corr} for c in commands]
        with self._answered:
            self._waiting[corr] = []
        info = self._client.publish(_CONTROL, json.dumps({"commands": cmds}), qos=1)
        with self._answered:
            done = self._answered.wait_for(lambda: bool(self._waiting.get(corr)), _TIMEOUT_S)
            responses = self._waiting.pop(corr, [])
        if not done:
            raise BrokerAuthError(
                f"the broker at {self.options.url} did not answer a provisioning command in "
                f"{_TIMEOUT_S:.0f} s (publish rc {info.rc}); is the dynamic-security plugin loaded?"
            )
        allowed = tuple(allow)
        for cmd, resp in zip(cmds, responses, strict=False):
            err = resp.get("error")
            if err and not any(a in err for a in allowed):
                raise BrokerAuthError(f"the broker refused {cmd['command']}: {err}")
        return responses

    # pumps ------------------------------------------------------------------------------------

    def has_pump(self, pump_id: str) -> bool:
        responses = self.run([{"command": "getClient", "username": pump_id}], allow=("not found",))
        return not responses[0].get("error")

    def add_pump(self, pump_id: str, password: str) -> None:
        """The pump's account and its own role; an existing one is an error."""
        role = pump_role(pump_id)
        if self.has_pump(pump_id):
            raise BrokerAuthError(
                f"pump {pump_id} already has a broker account: it is provisioned (cut it off "
                "with `pumpfleet pumps revoke`)"
            )
        self.run(
            [
                {
                    "command": "createRole",
                    "rolename": role,
                    "acls": [_acl("publishClientSend", pump_topic_filter(pump_id))],
                },
                {
                    "command": "createClient",
                    "username": pump_id,
                    "password": password,
                    "roles": [{"rolename": role}],
                },
            ],
            allow=("already exists",),
        )

    def revoke_pump(self, pump_id: str) -> bool:
        """Disable the account (a connected pump is disconnected at once, a new connection is
        refused). False when the broker has no such account."""
        responses = self.run(
            [{"command": "disableClient", "username": pump_id}], allow=("not found",)
        )
        return not responses[0].get("error")

    def pumps(self) -> dict[str, PumpAccount]:
        """Pump accounts (every account that is not a service account), by pump id."""
        listed = self.run([{"command": "listClients", "verbose": True}])
        clients = listed[0].get("data", {}).get("clients", [])
        services = set(ACCOUNTS.values())
        return {
            c["username"]: PumpAccount(c["username"], bool(c.get("disabled", False)))
            for c in clients
            if c.get("username") not in services
        }


def _check_pump_id(pump_id: str) -> None:
    if not pump_id or any(ch in pump_id for ch in "/+#\x00") or len(pump_id) > 64:
        raise BrokerAuthError(
            f"{pump_id!r} cannot be a pump id: no '/', '+', '#' and at most 64 characters"
        )
