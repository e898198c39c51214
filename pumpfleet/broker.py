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
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["SCHEMES", "BrokerConfigError", "BrokerOptions", "check_url"]

# URL scheme -> TLS on. `tcp`, `ssl` and `tls` are what other MQTT tools accept.
SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True, "tls": True}


class _Secret(Protocol):
    def get_secret_value(self) -> str: ...


class _MqttLike(Protocol):
    """What options are made of: `pumpfleet.settings.MqttSettings` (not imported: settings
    validates its URL with this module)."""

    @property
    def url(self) -> str: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> _Secret | None: ...
    @property
    def tls_ca(self) -> Path | None: ...
    @property
    def tls_cert(self) -> Path | None: ...
    @property
    def tls_key(self) -> Path | None: ...
    @property
    def keepalive_s(self) -> int: ...


@dataclass(frozen=True)
class _Url:
    url: str
    tls_ca: Path | None = None
    keepalive_s: int = 30
    username: str | None = None
    password: _Secret | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


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
    tls_ca_data: str | None = field(default=None, repr=False)
    """A CA bundle as PEM text (a pump's credentials file carries it inline), besides tls_ca."""

    @classmethod
    def from_settings(cls, mqtt: _MqttLike, pump_id: str | None = None) -> BrokerOptions:
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

    @classmethod
    def from_url(
        cls, url: str, *, tls_ca: Path | None = None, keepalive_s: int = 30
    ) -> BrokerOptions:
        """Options from a URL (credentials in its user info), e.g. a test stack's account."""
        return cls.from_settings(_Url(url=url, tls_ca=tls_ca, keepalive_s=keepalive_s))

    def paho_client(
        self, client_id: str, *, protocol: mqtt.MQTTProtocolVersion | None = None
    ) -> mqtt.Client:
        """An unconnected paho client (MQTT 5 unless told) with these credentials and TLS;
        connect it with `client.connect(options.host, options.port, ...)`."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if protocol is None else protocol,
        )
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set_context(self.tls_context())
        return client

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
            context = ssl.create_default_context(
                cafile=str(self.tls_ca) if self.tls_ca else None, cadata=self.tls_ca_data
            )
            if self.tls_cert:
                key = str(self.tls_key) if self.tls_key else None
                context.load_cert_chain(str(self.tls_cert), key)
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise BrokerConfigError(
                f"TLS files unusable ({exc}); check PUMPFLEET_MQTT__TLS_*"
            ) from None
        return context
