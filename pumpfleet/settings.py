"""One typed settings object for every part, from environment variables and a TOML file.

Precedence: explicit arguments, then `PUMPFLEET_*` environment variables (nested with `__`, e.g.
`PUMPFLEET_INGEST__BATCH_MAX=2000`), then the TOML file named by `PUMPFLEET_CONFIG` (default
`pumpfleet.toml` in the working directory, if present), then the connection settings of a
local stack started with `pumpfleet stack up`, then defaults that run locally.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_RUN_DIR = Path(".pumpfleet")


class MqttSettings(BaseModel):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    tls_ca: Path | None = Field(
        default=None, description="CA bundle for mqtts:// (default: the system trust store)."
    )
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        from pumpfleet.broker import check_url

        check_url(value)  # BrokerConfigError is a ValueError: pydantic reports it as such
        return value


class ProvisioningSettings(BaseModel):
    """`pumpfleet pumps provision|revoke|list`: the broker's provisioning account and what a
    provisioned pump is told (a local stack fills all three in)."""

    admin_url: SecretStr | None = Field(
        default=None, description="mqtt(s)://pumpfleet-admin:PASSWORD@host:port"
    )
    pump_url: str | None = Field(
        default=None, description="the broker URL written into pumps' credentials (mqtts://)"
    )
    pump_mtls_url: str | None = Field(
        default=None,
        description="the URL for pumps provisioned with a client certificate (default pump_url)",
    )
    pump_ca: Path | None = Field(
        default=None, description="CA bundle given to pumps inline (default: system trust)"
    )


class IngestSettings(BaseModel):
    client_id: str = "pumpfleet-ingest-1"
    shared_group: str | None = Field(
        default=None, description="MQTT 5 shared-subscription group; set to split load."
    )
    batch_max: int = Field(default=1000, ge=1, le=100_000)
    flush_ms: int = Field(default=100, ge=1, le=60_000)
    max_pending: int = Field(
        default=20_000, ge=1, description="Messages held unacknowledged before reading pauses."
    )
    max_payload_bytes: int = Field(default=16 * 1024, ge=256)
    unknown_pumps: Literal["quarantine", "register"] = Field(
        default="quarantine",
        description="A valid message from a pump not provisioned (no `pumps` row): quarantine "
        "(dead letter with the raw bytes, and an unprovisioned_device alert), or register it "
        "(a lab's explicit opt-in). A revoked pump is quarantined either way.",
    )
    rate_limit_per_s: float = Field(
        default=1.0,
        ge=0,
        description="Per-pump sustained message rate; beyond it (and the burst) messages are "
        "dead-lettered as rate limited. 0 turns the limit off (benchmarks).",
    )
    rate_limit_burst: int = Field(
        default=2000,
        ge=1,
        description="Messages a pump may send at once before the rate applies: a store-and-"
        "forward backlog replays at full speed (a day at 10 minutes is 144 messages).",
    )
    urgent_lane: bool = Field(
        default=True,
        description="Take events (a pump's own alarms) on a second MQTT session of their own, "
        "so an alarm is stored at once however much telemetry is queued before it.",
    )
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(
        default=9108, ge=0, le=65535, description="0 picks a free port; unset disables."
    )

    @field_validator("unknown_pumps", mode="before")
    @classmethod
    def _old_name(cls, value: object) -> object:
        """`dead-letter`, the old name, is what quarantine does (and now also says so)."""
        return "quarantine" if value == "dead-letter" else value


class AlertSettings(BaseModel):
    """The alert lifecycle and its notifications (ingest/alerts/README.md)."""

    lease_s: float = Field(
        default=5.0,
        ge=1,
        le=300,
        description="The active alerting instance's lease: a standby takes over this long after "
        "the active one stopped renewing it.",
    )
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(
        default=9465, ge=0, le=65535, description="`pumpfleet alerting`'s /metrics and /healthz."
    )
    clock: Literal["wall", "fleet"] = Field(
        default="wall",
        description="Watchdog and escalation clock: wall time, or the newest device time seen "
        "(for accelerated simulations).",
    )
    tick_s: float = Field(default=5.0, gt=0, le=3600, description="Watchdog period.")
    unacked_escalation_s: float = Field(
        default=900.0, gt=0, description="A high alert not acknowledged this long escalates."
    )
    continue_history_s: float = Field(
        default=3600.0,
        ge=0,
        description="At most one 'continue' history row per alert this often (0: every one).",
    )
    warm_hours: float = Field(
        default=48.0, ge=0, description="Telemetry and events replayed into the rules at start."
    )
    alertmanager_url: str | None = Field(
        default=None, description="e.g. http://127.0.0.1:9093; unset: nothing is sent there."
    )
    alertmanager_resend_s: float = Field(
        default=60.0,
        gt=0,
        description="Open alerts are re-sent this often; keep it well under Alertmanager's "
        "resolve_timeout (default 5m).",
    )
    webhook_url: SecretStr | None = Field(
        default=None,
        description="Generic JSON webhook; unset: nothing is sent there. Secret: such URLs "
        "often carry a key.",
    )
    webhook_token: SecretStr | None = Field(
        default=None, description="Sent as `Authorization: Bearer ...` to the webhook."
    )
    generator_url: str = Field(
        default="http://localhost/pumpfleet/alerts/{alert_id}",
        description="Link back to the alert, in notifications; {alert_id} is replaced.",
    )
    http_timeout_s: float = Field(default=5.0, gt=0, le=120)
    retry_min_s: float = Field(default=1.0, gt=0, description="First retry delay.")
    retry_max_s: float = Field(default=300.0, gt=0, description="Retry delay cap.")
    rules: dict[str, Any] = Field(
        default_factory=dict,
        description="Rule thresholds, priorities and holds (ingest/rules/README.md); "
        "unset ones keep domain.md's values, e.g. [alerts.rules] refill_discrepancy_ml = 2.5",
    )
    poll_s: float = Field(default=1.0, gt=0, le=60, description="Outbox poll period.")
    outbox_keep_days: float = Field(
        default=30.0, gt=0, description="Delivered notifications are kept this long."
    )

    @model_validator(mode="after")
    def _retry_order(self) -> AlertSettings:
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s must be at least retry_min_s")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PUMPFLEET_", env_nested_delimiter="__", extra="forbid"
    )

    run_dir: Path = DEFAULT_RUN_DIR
    database_url: SecretStr = SecretStr("postgresql://pumpfleet@127.0.0.1:5432/pumpfleet")
    mqtt: MqttSettings = MqttSettings()
    provisioning: ProvisioningSettings = ProvisioningSettings()
    ingest: IngestSettings = IngestSettings()
    alerts: AlertSettings = AlertSettings()
    log_level: str = "INFO"

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(
                "is not a PostgreSQL URL (postgresql://user@host:port/database); check "
                "PUMPFLEET_DATABASE_URL or database_url in pumpfleet.toml"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config = Path(os.environ.get("PUMPFLEET_CONFIG", "pumpfleet.toml"))
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=config),
            _StackSource(settings_cls),
        )


class _StackSource(PydanticBaseSettingsSource):
    """Connection settings of a running local stack (`pumpfleet stack up`), if there is one."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        from pumpfleet import stack

        info = stack.load(Path(os.environ.get("PUMPFLEET_RUN_DIR", DEFAULT_RUN_DIR)))
        if info is None:
            return {}
        account = _STACK_ACCOUNT.get()
        url = info.mqtt_url_for(account) if account else info.mqtt_url
        return {
            "database_url": info.database_url,
            "mqtt": {"url": url},
            "provisioning": {
                "admin_url": info.mqtt_url_for("admin") if info.mqtt_passwords else None,
                "pump_url": info.mqtts_url if info.mqtts_port else None,
                "pump_mtls_url": info.mqtt_mtls_url if info.mqtt_mtls_port else None,
                "pump_ca": info.tls_ca if info.mqtts_port else None,
            },
        }


_STACK_ACCOUNT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "stack_account", default=None
)


def load_settings(*, broker_account: str | None = None, **overrides: Any) -> Settings:
    """The settings; on a local stack with no broker URL configured, `broker_account` (a
    service account of `pumpfleet.brokerauth.ACCOUNTS`) is the account the stack lends. Without
    one the URL has no credentials and the broker refuses: a pump brings its own
    (`pumpfleet agent --credentials`)."""
    token = _STACK_ACCOUNT.set(broker_account)
    try:
        return Settings(**overrides)
    finally:
        _STACK_ACCOUNT.reset(token)
