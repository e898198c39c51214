"""One broker URL parser for every part (pumpfleet.broker): what each URL means, and that
`mqtts://` is TLS everywhere, verified against the system trust store when no CA is given."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import SecretStr

from ingest import Ingester
from pumpfleet.broker import BrokerConfigError, BrokerOptions
from pumpfleet.settings import MqttSettings, Settings


def test_mqtts_without_a_ca_is_tls_with_the_system_trust_store() -> None:
    opts = BrokerOptions.from_settings(MqttSettings(url="mqtts://broker.example"))
    assert (opts.tls, opts.port, opts.url) == (True, 8883, "mqtts://broker.example:8883")
    context = opts.tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0 or ssl.get_default_verify_paths().cafile


def test_the_ingester_uses_tls_for_mqtts_without_a_ca() -> None:
    """Found by reading: it switched TLS on only when a CA file was set, sending plaintext."""
    settings = Settings(mqtt={"url": "mqtts://broker.example:8884"})
    ing = Ingester(settings)
    assert (ing.broker.tls, ing.broker.host, ing.broker.port) == (True, "broker.example", 8884)


def test_tls_files_with_a_plain_url_are_refused_not_ignored(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    with pytest.raises(BrokerConfigError, match="plain MQTT; use an mqtts:// URL"):
        BrokerOptions.from_settings(MqttSettings(url="mqtt://h", tls_ca=ca))


def test_credentials_from_settings_or_url_and_per_pump_user_names() -> None:
    opts = BrokerOptions.from_settings(
        MqttSettings(url="mqtt://h:1884", username="pump-{pump_id}", password=SecretStr("pw")),
        "P-1",
    )
    assert (opts.username, opts.password, opts.port) == ("pump-P-1", "pw", 1884)
    assert "pw" not in repr(opts)
    from_url = BrokerOptions.from_settings(MqttSettings(url="mqtt://u:p%40ss@h"))
    assert (from_url.username, from_url.password) == ("u", "p@ss")


@pytest.mark.parametrize("url", ["http://h:1", "mqtt://", "mqtt://h:99999", "h:1883"])
def test_a_url_that_is_not_mqtt_names_the_setting(url: str) -> None:
    with pytest.raises(ValueError, match="PUMPFLEET_MQTT__URL"):
        MqttSettings(url=url)
