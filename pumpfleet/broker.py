"""How every part reaches the broker: one URL parser, one set of options, one TLS context.

`mqtt://host[:port]` is plain TCP (default port 1883). `mqtts://host[:port]` is TLS (default
port 8883), verifying the server against the system trust store unless a CA bundle is given;
a CA bundle or client certificate with an `mqtt://` URL is a configuration error, not a quiet
switch to TLS or a quiet plaintext connection. Credentials come from the settings, or from the
URL's user info; `{pump_id}` in the user name is filled in, so a fleet can share one setting with
per-pump accounts.
"""

from __future__ import annotations

import ssl
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pumpfleet.settings import MqttSettings

__all__ = ["SCHEMES", "BrokerConfigError", "BrokerOptions", "check_url"]

# URL scheme -> TLS on. `tcp`, `ssl` and `tls` are what other MQTT tools accept.
SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True, "tls": True}


class BrokerConfigError(ValueError):
    """Broker settings that cannot work; the message says what to change."""


def check_url(value: str) -> urllib.parse.SplitResult:
    """The parsed URL, or BrokerConfigError naming what is wrong with it."""
    parts = urllib.parse.urlsplit(value)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if parts.scheme not in SCHEMES or not parts.hostname or not port_ok:
        raise BrokerConfigError(
            f"{value!r} is not mqtt://host:port or mqtts://host:port; check "
            "PUMPFLEET_MQTT__URL or [mqtt] url in pumpfleet.toml"
        )
    return parts


@dataclass(frozen=True)
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive_s: int = 30

    @classmethod
    def from_settings(cls, mqtt: MqttSettings, pump_id: str | None = None) -> BrokerOptions:
        url = check_url(mqtt.url)
        tls = SCHEMES[url.scheme]
        if not tls and (mqtt.tls_ca or mqtt.tls_cert):
            raise BrokerConfigError(
                f"TLS files are set but {mqtt.url!r} is plain MQTT; use an mqtts:// URL "
                "(PUMPFLEET_MQTT__URL) or unset PUMPFLEET_MQTT__TLS_*"
            )
        username = mqtt.username or (urllib.parse.unquote(url.username or "") or None)
        if username and pump_id is not None:
            username = username.replace("{pump_id}", pump_id)
        password = mqtt.password.get_secret_value() if mqtt.password else None
        if password is None and url.password:
            password = urllib.parse.unquote(url.password)
        return cls(
            host=url.hostname or "127.0.0.1",
            port=url.port or (8883 if tls else 1883),
            tls=tls,
            tls_ca=mqtt.tls_ca,
            tls_cert=mqtt.tls_cert,
            tls_key=mqtt.tls_key,
            username=username,
            password=password,
            keepalive_s=mqtt.keepalive_s,
        )

    @property
    def url(self) -> str:
        """For logs: never carries credentials."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext:
        """Verifies the server (the CA bundle, else the system trust store) and presents the
        client certificate if one is set. Unusable files raise BrokerConfigError."""
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise BrokerConfigError(
                    f"{name} {path} does not exist; fix PUMPFLEET_MQTT__{name.upper()}"
                )
        try:
            context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
            if self.tls_cert:
                key = str(self.tls_key) if self.tls_key else None
                context.load_cert_chain(str(self.tls_cert), key)
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise BrokerConfigError(
                f"TLS files unusable ({exc}); check PUMPFLEET_MQTT__TLS_*"
            ) from None
        return context
