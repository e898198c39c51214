"""Provisioning: a pump gets a broker account of its own and a registry row in one step, and a
credentials file its agent reads; revoking cuts it off at the broker and marks the registry.

The order makes a half-done step safe: provisioning writes the registry row first (a row without
a broker account is a pump that cannot publish), then the account, then the file; revoking
disables the account first (the pump is cut off at once), then marks the row (from then on the
ingesters quarantine anything of it still queued).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from pumpfleet import brokerauth, contract
from pumpfleet.broker import BrokerOptions
from pumpfleet.schema.registry import Registration, register

__all__ = [
    "CAPACITIES_ML",
    "ProvisionError",
    "PumpCredentials",
    "PumpRecord",
    "list_pumps",
    "provision",
    "read_credentials",
    "revoke",
]

CAPACITIES_ML = (20.0, 40.0)
"""The reservoir sizes of the pumps in domain.md."""

_LOW_ALARM_ML = {False: 2.0, True: 4.0}
"""domain.md: the low-reservoir alarm at 2 mL, 4 mL for a high-risk patient."""


class ProvisionError(Exception):
    """A provisioning step that cannot be done; the message says what to do."""


class PumpCredentials(BaseModel):
    """What a pump's agent needs to reach the broker: one JSON file, mode 0600."""

    model_config = ConfigDict(extra="forbid")

    pump_id: str = Field(pattern=contract.PUMP_ID_PATTERN)
    broker_url: str
    username: str
    password: str = Field(repr=False)
    ca_pem: str | None = Field(default=None, repr=False)
    client_cert: str | None = None
    client_key: str | None = None

    def broker_options(self, keepalive_s: int = 30, base: Path | None = None) -> BrokerOptions:
        """Options for the agent; certificate paths are relative to the file's directory."""
        from pumpfleet.settings import MqttSettings

        here = base or Path(".")
        options = BrokerOptions.from_settings(
            MqttSettings(
                url=self.broker_url,
                username=self.username,
                password=SecretStr(self.password),
                tls_cert=here / self.client_cert if self.client_cert else None,
                tls_key=here / self.client_key if self.client_key else None,
                keepalive_s=keepalive_s,
            )
        )
        return BrokerOptions(**{**options.__dict__, "tls_ca_data": self.ca_pem})


def read_credentials(path: Path) -> PumpCredentials:
    try:
        return PumpCredentials.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise ProvisionError(
            f"cannot read {path} ({exc.strerror}); write it with `pumpfleet pumps provision`"
        ) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the file"
        raise ProvisionError(
            f"{path} is not a pump credentials file ({where}: {first['msg']}); "
            "write it again with `pumpfleet pumps provision`"
        ) from None


@dataclass(frozen=True)
class PumpRecord:
    pump_id: str
    capacity_ml: float | None
    high_risk: bool
    registered_at: datetime | None
    revoked_at: datetime | None
    broker: str  # "enabled", "disabled" or "none"


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


async def provision(
    *,
    pump_id: str,
    database_url: str,
    admin: BrokerOptions,
    pump_broker_url: str,
    out_dir: Path,
    ca_pem: str | None,
    capacity_ml: float = 20.0,
    high_risk: bool = False,
    concentration_mcg_per_ml: float = 2000.0,
    reporting_interval_s: int = 600,
    clinic: str = "unassigned",
    client_cert: tuple[Path, Path] | None = None,
) -> Path:
    """Register the pump, give it a broker account and write `<out_dir>/<pump_id>.json`."""
    brokerauth.pump_topic_filter(pump_id)  # a pump id a topic can carry
    if capacity_ml not in CAPACITIES_ML:
        raise ProvisionError(f"--capacity-ml {capacity_ml:g}: the pumps hold 20 or 40 mL")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ProvisionError(
            f"cannot create {out_dir} ({exc.strerror}); pick another --out"
        ) from None
    with brokerauth.Admin(admin) as broker:
        if broker.has_pump(pump_id):
            raise ProvisionError(
                f"pump {pump_id} is provisioned already (its broker account exists); "
                "`pumpfleet pumps list` shows it"
            )
    conn = await _connect(database_url)
    try:
        revoked = await conn.fetchval("SELECT revoked_at FROM pumps WHERE pump_id = $1", pump_id)
        if revoked is not None:
            raise ProvisionError(
                f"pump {pump_id} was revoked at {revoked:%Y-%m-%d %H:%M:%S %Z}; a revoked "
                "identity is not given back: provision the replacement under a new id"
            )
        await register(
            conn,
            [
                Registration(
                    pump_id=pump_id,
                    clinic=clinic,
                    reservoir_capacity_ml=capacity_ml,
                    concentration_mcg_per_ml=concentration_mcg_per_ml,
                    low_reservoir_alarm_ml=_LOW_ALARM_ML[high_risk],
                    reporting_interval_s=reporting_interval_s,
                    high_risk=high_risk,
                )
            ],
        )
    except asyncpg.PostgresError as exc:
        raise ProvisionError(f"the registry refused pump {pump_id}: {exc}") from None
    finally:
        await conn.close()
    password = brokerauth.new_password()
    with brokerauth.Admin(admin) as broker:
        broker.add_pump(pump_id, password)
    cert_name = key_name = None
    if client_cert is not None:
        cert_name, key_name = f"{pump_id}.crt", f"{pump_id}.key"
        for src, name in ((client_cert[0], cert_name), (client_cert[1], key_name)):
            _write_private(out_dir / name, Path(src).read_text())
    creds = PumpCredentials(
        pump_id=pump_id,
        broker_url=pump_broker_url,
        username=pump_id,
        password=password,
        ca_pem=ca_pem,
        client_cert=cert_name,
        client_key=key_name,
    )
    path = out_dir / f"{pump_id}.json"
    _write_private(path, json.dumps(creds.model_dump(exclude_none=True), indent=2) + "\n")
    return path


async def revoke(*, pump_id: str, database_url: str, admin: BrokerOptions) -> tuple[bool, bool]:
    """Disable the pump's broker account (a connected pump is disconnected) and mark its
    registry row revoked. Returns (had a broker account, had a registry row)."""
    with brokerauth.Admin(admin) as broker:
        had_account = broker.revoke_pump(pump_id)
    conn = await _connect(database_url)
    try:
        status = await conn.execute(
            "UPDATE pumps SET revoked_at = coalesce(revoked_at, now()) WHERE pump_id = $1",
            pump_id,
        )
    finally:
        await conn.close()
    had_row = status.split()[-1] != "0"
    if not had_account and not had_row:
        raise ProvisionError(f"pump {pump_id} is neither provisioned nor registered")
    return had_account, had_row


async def list_pumps(*, database_url: str, admin: BrokerOptions) -> list[PumpRecord]:
    """Every pump the registry or the broker knows, with both their states."""
    with brokerauth.Admin(admin) as broker:
        accounts = broker.pumps()
    conn = await _connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT pump_id, reservoir_capacity_ml, high_risk, registered_at, revoked_at "
            "FROM pumps ORDER BY pump_id"
        )
    finally:
        await conn.close()
    records = []
    for row in rows:
        account = accounts.pop(row["pump_id"], None)
        state = "none" if account is None else ("disabled" if account.disabled else "enabled")
        records.append(
            PumpRecord(
                row["pump_id"],
                row["reservoir_capacity_ml"],
                row["high_risk"],
                row["registered_at"],
                row["revoked_at"],
                state,
            )
        )
    for pump_id, account in sorted(accounts.items()):  # an account with no registry row
        state = "disabled" if account.disabled else "enabled"
        records.append(PumpRecord(pump_id, None, False, None, None, state))
    return records


async def _connect(database_url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(database_url, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ProvisionError(
            f"cannot reach the database ({exc}); check PUMPFLEET_DATABASE_URL "
            "(provisioning writes the registry as the owner)"
        ) from None
