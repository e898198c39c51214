"""The ingester's and the database's half of docs/security.md, against real mosquitto and
PostgreSQL: quarantine of pumps that are not provisioned or revoked (and their alert), the
per-pump rate limit, the application's database roles, and hostile text stored as text.

Every integration test counts rows in the database, and the ingester and alerting service run
as login roles granted only the roles the migrations create."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from pubtools import Publisher, forget_session, telemetry

import ingest._service
from ingest import Ingester, TokenBuckets
from ingest.alerts import Alerting, Book, acknowledge, build_engine
from ingest.alerts import _service as alerts_service
from pumpfleet import contract, schema
from pumpfleet import stack as stack_mod
from pumpfleet.findings import RULES, SERVICE_RULE_PRIORITY, SERVICE_RULES, Finding
from pumpfleet.settings import IngestSettings, Settings
from pumpfleet.testing import until

UNPROVISIONED = "unprovisioned_device"


# The rate limit's arithmetic (pure) ------------------------------------------------------------


def test_a_bucket_lets_the_burst_through_then_the_sustained_rate() -> None:
    buckets = TokenBuckets(rate_per_s=1.0, burst=600)
    assert all(buckets.take("P-1", 100.0) for _ in range(600))
    assert not buckets.take("P-1", 100.0)
    assert not buckets.take("P-1", 100.5)  # half a token back
    assert buckets.take("P-1", 101.5)  # one second after the burst ran out: one more
    assert not buckets.take("P-1", 101.5)
    assert buckets.take("P-2", 101.5)  # another pump has a bucket of its own


def test_the_default_burst_takes_a_day_backlog_and_more_at_full_speed() -> None:
    """A store-and-forward replay comes at full speed: a day at a 10-minute interval is 144
    messages, a day at one minute 1,440. Neither may be throttled; a flood beyond is."""
    cfg = IngestSettings()
    buckets = TokenBuckets(cfg.rate_limit_per_s, cfg.rate_limit_burst)
    replay = 1_440 + 100  # a day at one minute, with events and statuses
    assert all(buckets.take("P-1", 0.0) for _ in range(replay))
    # ...and a pump at its real pace never gets near the limit over a year of messages.
    assert all(buckets.take("P-2", 600.0 * i) for i in range(365 * 144))
    flood = sum(buckets.take("P-3", 0.0) for _ in range(20_000))
    assert flood == cfg.rate_limit_burst


def test_buckets_forget_pumps_that_have_paid_back_so_memory_stays_bounded() -> None:
    buckets = TokenBuckets(rate_per_s=1.0, burst=10, size=100)
    for i in range(100_000):  # a new pump id every millisecond: a spoofer's random ids
        buckets.take(f"X-{i}", i / 1000)
    # A bucket one token short is full again a second later: what is kept is about the last
    # second's pumps (1,000), at most twice that, not 100,000.
    assert len(buckets) <= 2_000
    # One still paying back is kept: forgetting it would hand it a fresh burst.
    flooder = TokenBuckets(rate_per_s=1.0, burst=10, size=4)
    assert sum(flooder.take("F", 0.0) for _ in range(20)) == 10
    for i in range(50):
        flooder.take(f"X-{i}", 0.0)
    assert not flooder.take("F", 0.5)


def test_quarantine_is_the_default_and_register_an_explicit_opt_in() -> None:
    assert IngestSettings().unknown_pumps == "quarantine"
    assert IngestSettings(unknown_pumps="dead-letter").unknown_pumps == "quarantine"  # old name
    assert IngestSettings(unknown_pumps="register").unknown_pumps == "register"
    with pytest.raises(ValueError):
        IngestSettings(unknown_pumps="store")


def test_the_unprovisioned_alert_is_a_medium_alert_outside_the_rule_engine() -> None:
    assert SERVICE_RULES == (UNPROVISIONED,)
    assert SERVICE_RULE_PRIORITY[UNPROVISIONED] == "medium"
    assert UNPROVISIONED not in RULES  # the engine never sees a quarantined message


def test_every_test_the_threat_model_names_exists() -> None:
    from test_safety_doc import _TEST_NAME, ROOT, defined_functions

    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    named = set(_TEST_NAME.findall(text))
    assert len(named) >= 15
    assert not named - defined_functions(), "docs/security.md names tests that do not exist"


# Fixtures -----------------------------------------------------------------------------------------


@pytest.fixture
async def db_url(database_url: str) -> str:
    await schema.migrate(database_url)
    return database_url


def _as_user(url: str, user: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = f"{user}@{parts.hostname}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


@asynccontextmanager
async def login(db_url: str, group: str) -> AsyncIterator[str]:
    """A login role of the test's own, member of `group` only (trust auth on the loopback);
    yields its database URL. Roles are cluster-wide: it is dropped afterwards."""
    name = f"t_{group}_{uuid.uuid4().hex[:8]}"
    owner = await asyncpg.connect(db_url)
    try:
        await owner.execute(f"CREATE ROLE {name} LOGIN IN ROLE {group}")
        yield _as_user(db_url, name)
    finally:
        await owner.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name
        )
        await owner.execute(f"DROP OWNED BY {name}")
        await owner.execute(f"DROP ROLE {name}")
        await owner.close()


@pytest.fixture
def client_ids(stack: stack_mod.StackInfo) -> Any:
    made: list[str] = []

    def new() -> str:
        made.append(f"sec-test-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    for cid in made:
        forget_session(stack.mqtt_url_for("ingest"), cid)


def settings_for(
    stack: stack_mod.StackInfo, db_url: str, client_id: str, **ingest: Any
) -> Settings:
    return Settings(
        database_url=db_url,
        mqtt={"url": stack.mqtt_url_for("ingest")},
        ingest={"client_id": client_id, "metrics_port": None, "flush_ms": 50, **ingest},
        alerts={"metrics_port": None},
    )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Ingester]:
    ingester = Ingester(settings)
    task = asyncio.create_task(ingester.run())
    try:
        await ingester.wait_connected(timeout=20)
        yield ingester
    finally:
        ingester.stop()
        await asyncio.wait_for(task, timeout=60)


def publish(stack: stack_mod.StackInfo, messages: Sequence[tuple[str, bytes]]) -> None:
    pub = Publisher(stack.mqtt_url_for("fleet"))
    try:
        pub.publish(messages)
        pub.wait_acked(120)
    finally:
        pub.close()


async def provision(db_url: str, pump_ids: Sequence[str], revoked: bool = False) -> None:
    """What a clinic's provisioning does (no CLI yet): a `pumps` row per pump, as the owner."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO pumps (pump_id, revoked_at) SELECT p, CASE WHEN $2 THEN now() END "
            "FROM unnest($1::text[]) p",
            list(pump_ids),
            revoked,
        )
    finally:
        await conn.close()


async def scalar(db_url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


def feed(pump_id: str, seqs: range) -> list[tuple[str, bytes]]:
    return [(contract.topic(pump_id, "telemetry"), telemetry(pump_id, s)) for s in seqs]


def counters_add_up(ing: Ingester) -> bool:
    s = ing.stats
    return s.received == s.written + s.dead_lettered + s.duplicates + s.statuses_superseded


# Quarantine ---------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_unprovisioned_and_revoked_pumps_are_quarantined_with_one_alert_per_pump(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never stored as a patient's data: a pump with no `pumps` row and a revoked one go to the
    dead letters (reason, raw bytes) and `quarantine_seen`; the alerting service opens one
    unprovisioned_device alert per pump, keeps it while they publish, ends it once the pump is
    provisioned; a pump provisioned meanwhile is stored from then on, one revoked meanwhile is
    quarantined within the refresh time."""
    monkeypatch.setattr(ingest._service, "REVOKED_REFRESH_S", 0.2)
    monkeypatch.setattr(alerts_service, "QUARANTINE_EVERY_S", 0.0)  # every tick reads it
    tag = uuid.uuid4().hex[:6].upper()
    good, stranger, revoked = f"G-{tag}", f"U-{tag}", f"R-{tag}"
    await provision(db_url, [good])
    await provision(db_url, [revoked], revoked=True)
    first = feed(good, range(20)) + feed(stranger, range(20)) + feed(revoked, range(5))
    async with (
        login(db_url, "pumpfleet_ingest") as ingest_url,
        login(db_url, "pumpfleet_alerting") as alerting_url,
        running(settings_for(stack, ingest_url, client_ids())) as ing,
    ):
        await asyncio.to_thread(publish, stack, first)

        async def first_stored() -> bool:
            return await scalar(
                db_url,
                "SELECT (SELECT count(*) FROM telemetry WHERE pump_id = $1) = 20 AND "
                "(SELECT count(*) FROM dead_letter WHERE pump_id IN ($2, $3)) = 25",
                good,
                stranger,
                revoked,
            )

        await until(first_stored, 30, "the provisioned pump stored, the others quarantined")
        conn = await asyncpg.connect(db_url)
        try:
            held = await conn.fetch(
                "SELECT pump_id, reason, payload FROM dead_letter WHERE pump_id IN ($1, $2)",
                stranger,
                revoked,
            )
            assert {(r["pump_id"], r["reason"]) for r in held} == {
                (stranger, f"quarantine: pump {stranger} is not provisioned"),
                (revoked, f"quarantine: pump {revoked} is revoked"),
            }
            sent = {p for t, p in first if not t.startswith(f"pumps/{good}/")}
            assert {r["payload"] for r in held} == sent  # the raw bytes, every one
            assert not await conn.fetchval(
                "SELECT count(*) FROM telemetry WHERE pump_id IN ($1, $2)", stranger, revoked
            )
            seen = dict(
                await conn.fetch(
                    "SELECT pump_id, messages FROM quarantine_seen WHERE pump_id IN ($1, $2)",
                    stranger,
                    revoked,
                )
            )
            assert seen == {stranger: 20, revoked: 5}
            assert not await conn.fetchval(
                "SELECT count(*) FROM pumps WHERE pump_id = $1", stranger
            )
        finally:
            await conn.close()
        assert ing.stats.quarantined >= 25 and counters_add_up(ing)

        # The alerting service, as its own role: one alert per pump, and only one.
        alerting = Alerting(
            Settings(database_url=alerting_url, alerts={"metrics_port": None}),
            build_engine(Settings()),
        )
        await alerting.start()
        try:
            await alerting.tick()
            await alerting.tick()  # still publishing, still one alert each
            await asyncio.to_thread(publish, stack, feed(stranger, range(20, 25)))
            await until(
                lambda: scalar(
                    db_url, "SELECT messages = 25 FROM quarantine_seen WHERE pump_id = $1", stranger
                ),
                30,
                "more quarantined messages",
            )
            await alerting.tick()
            conn = await asyncpg.connect(db_url)
            try:
                rows = await conn.fetch(
                    "SELECT pump_id, priority, summary, ended_at, clinic FROM alerts "
                    "WHERE rule = $1 AND pump_id IN ($2, $3) ORDER BY pump_id",
                    UNPROVISIONED,
                    stranger,
                    revoked,
                )
                assert [(r["pump_id"], r["priority"], r["ended_at"]) for r in rows] == [
                    (revoked, "medium", None),
                    (stranger, "medium", None),
                ]
                assert "unprovisioned device publishing" in rows[1]["summary"]
                assert "is revoked" in rows[0]["summary"]
                starts = await conn.fetchval(
                    "SELECT count(*) FROM alert_history h JOIN alerts a USING (alert_id) "
                    "WHERE a.rule = $1 AND a.pump_id IN ($2, $3) AND h.phase = 'start'",
                    UNPROVISIONED,
                    stranger,
                    revoked,
                )
                assert starts == 2

                # The clinic provisions the stranger: its alert ends, its next messages are
                # stored (no ingester restart), and the good pump, revoked now, is held.
                await conn.execute("INSERT INTO pumps (pump_id) VALUES ($1)", stranger)
                await conn.execute("UPDATE pumps SET revoked_at = now() WHERE pump_id = $1", good)
                await alerting.tick()
                ended = await conn.fetchval(
                    "SELECT ended_at IS NOT NULL FROM alerts WHERE rule = $1 AND pump_id = $2",
                    UNPROVISIONED,
                    stranger,
                )
                assert ended
                await asyncio.sleep(0.3)  # past the (shortened) revocation refresh
                later = feed(stranger, range(100, 110)) + feed(good, range(100, 110))
                await asyncio.to_thread(publish, stack, later)

                async def after() -> bool:
                    return await scalar(
                        db_url,
                        "SELECT (SELECT count(*) FROM telemetry WHERE pump_id = $1) = 10 AND "
                        "(SELECT count(*) FROM dead_letter WHERE pump_id = $2 "
                        " AND reason = 'quarantine: pump ' || $2 || ' is revoked') = 10",
                        stranger,
                        good,
                    )

                await until(after, 30, "the provisioned pump stored, the revoked one held")
                assert (
                    await conn.fetchval("SELECT count(*) FROM telemetry WHERE pump_id = $1", good)
                    == 20
                )
                await alerting.tick()
                open_now = await conn.fetch(
                    "SELECT pump_id FROM alerts WHERE rule = $1 AND ended_at IS NULL "
                    "AND pump_id IN ($2, $3, $4) ORDER BY pump_id",
                    UNPROVISIONED,
                    good,
                    stranger,
                    revoked,
                )
                assert [r[0] for r in open_now] == [good, revoked]
            finally:
                await conn.close()
        finally:
            await alerting.close()
        assert counters_add_up(ing)


# Rate limit ---------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_flooding_pump_is_throttled_and_every_other_pump_is_stored_in_full(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any
) -> None:
    """One pump floods 20,000 messages while 50 pumps send 100 each and one replays a day's
    backlog of 1,000 at full speed: every other pump's messages are stored, the flooder gets
    its burst plus the sustained rate and the rest is kept as rate-limited dead letters (nothing
    lost), counted in the metric. Default limits; counts from the database."""
    tag = uuid.uuid4().hex[:6].upper()
    flooder, replayer = f"F-{tag}", f"B-{tag}"
    others = [f"O{n:02d}-{tag}" for n in range(50)]
    await provision(db_url, [flooder, replayer, *others])
    flood = feed(flooder, range(20_000))
    rest = [m for seq in range(100) for p in others for m in feed(p, range(seq, seq + 1))]
    rest += feed(replayer, range(1_000))
    # Interleaved: the others publish while the flood is going on, not after it.
    mixed: list[tuple[str, bytes]] = []
    every, taken = len(flood) // len(rest) + 1, 0
    for i, msg in enumerate(flood):
        mixed.append(msg)
        if i % every == 0:
            mixed.append(rest[taken])
            taken += 1
    mixed += rest[taken:]
    assert len(mixed) == 26_000
    cfg = IngestSettings()
    async with (
        login(db_url, "pumpfleet_ingest") as ingest_url,
        running(settings_for(stack, ingest_url, client_ids())) as ing,
    ):
        started = asyncio.get_running_loop().time()
        await asyncio.to_thread(publish, stack, mixed)

        async def all_accounted() -> bool:
            return await scalar(
                db_url,
                "SELECT (SELECT count(*) FROM telemetry WHERE pump_id = $1) + "
                "(SELECT count(*) FROM dead_letter WHERE pump_id = $1) = 20000 AND "
                "(SELECT count(*) FROM telemetry WHERE pump_id <> $1) = 6000",
                flooder,
            )

        await until(all_accounted, 120, "every message stored or kept as a dead letter")
        elapsed = asyncio.get_running_loop().time() - started
        conn = await asyncpg.connect(db_url)
        try:
            stored = await conn.fetchval(
                "SELECT count(*) FROM telemetry WHERE pump_id = $1", flooder
            )
            limited = await conn.fetch(
                "SELECT pump_id, reason FROM dead_letter WHERE reason LIKE 'rate limited%'"
            )
            per_pump = dict(
                await conn.fetch(
                    "SELECT pump_id, count(*) FROM telemetry WHERE pump_id <> $1 GROUP BY 1",
                    flooder,
                )
            )
            distinct = await conn.fetchval(
                "SELECT count(DISTINCT seq) FROM ("
                " SELECT seq FROM telemetry WHERE pump_id = $1 UNION ALL"
                " SELECT (convert_from(payload, 'UTF8')::jsonb ->> 'seq')::int8 FROM dead_letter"
                " WHERE pump_id = $1) s",
                flooder,
            )
        finally:
            await conn.close()
        assert per_pump == {**dict.fromkeys(others, 100), replayer: 1_000}
        assert {r["pump_id"] for r in limited} == {flooder}
        assert cfg.rate_limit_burst <= stored <= cfg.rate_limit_burst + elapsed + 1
        assert len(limited) == 20_000 - stored
        assert distinct == 20_000  # each flood message once, stored or dead-lettered
        assert ing.stats.rate_limited == len(limited)
        assert counters_add_up(ing)


# Database roles -----------------------------------------------------------------------------------


async def _denied(conn: asyncpg.Connection, sql: str, *args: Any) -> bool:
    try:
        async with conn.transaction():
            await conn.execute(sql, *args)
    except asyncpg.InsufficientPrivilegeError:
        return True
    return False


@pytest.mark.integration
async def test_each_application_role_can_do_its_job_and_nothing_more(db_url: str) -> None:
    owner = await asyncpg.connect(db_url)
    try:
        roles = dict(
            await owner.fetch(
                "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY($1::text[])",
                ["pumpfleet_ingest", "pumpfleet_alerting", "pumpfleet_reader"],
            )
        )
        assert roles == dict.fromkeys(
            ["pumpfleet_ingest", "pumpfleet_alerting", "pumpfleet_reader"], False
        )
        await owner.execute("INSERT INTO pumps (pump_id) VALUES ('P-1')")
        alert_id = await owner.fetchval(
            "INSERT INTO alerts (pump_id, rule, priority, phase, summary, started_at, updated_at)"
            " VALUES ('P-1', 'low_reservoir', 'medium', 'start', 'low', now(), now())"
            " RETURNING alert_id"
        )
        await owner.execute(
            "INSERT INTO alert_history (alert_id, phase, priority) VALUES ($1, 'start', 'medium')",
            alert_id,
        )
    finally:
        await owner.close()
    insert_telemetry = (
        "INSERT INTO telemetry (time, pump_id, seq, delivered_ul_per_h, programmed_rate_ul_per_h,"
        " programmed_dose_mcg_per_day, reservoir_ml, reservoir_capacity_ml,"
        " low_reservoir_alarm_ml, concentration_mcg_per_ml, battery_pct, battery_eri, pump_state)"
        " VALUES (now(), 'P-1', $1, 10, 10, 500, 12, 20, 2, 2000, 80, false, 'infusing')"
    )
    history_edits = (
        "UPDATE alert_history SET note = 'nothing happened'",
        "DELETE FROM alert_history",
        "TRUNCATE alert_history",
    )
    ddl = (
        "CREATE TABLE public.mine (x int)",
        "DROP TABLE telemetry",
        "ALTER TABLE pumps ADD x int",
    )

    async with login(db_url, "pumpfleet_ingest") as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(insert_telemetry, 1)  # its job
            await conn.execute(
                "INSERT INTO dead_letter (topic, payload, reason) VALUES ('t', '\\x00', 'r')"
            )
            for sql in (*ddl, *history_edits):
                assert await _denied(conn, sql), sql
            for sql in (
                "DELETE FROM telemetry",
                "UPDATE telemetry SET reservoir_ml = 0",
                "INSERT INTO pumps (pump_id) VALUES ('P-2')",  # no self-provisioning
                "UPDATE pumps SET revoked_at = NULL",  # nor un-revoking
                "SELECT * FROM alerts",
                "INSERT INTO alert_history (alert_id, phase, priority) VALUES (1, 'end', 'low')",
                "DELETE FROM dead_letter",
            ):
                assert await _denied(conn, sql), sql
        finally:
            await conn.close()

    async with login(db_url, "pumpfleet_alerting") as url:
        conn = await asyncpg.connect(url)
        try:
            # Its job: the lifecycle (acknowledge writes the alert and its history).
            acked = await acknowledge(conn, alert_id, "dr.test", note="on it")
            assert acked.acked_by == "dr.test"
            for sql in (*ddl, *history_edits):
                assert await _denied(conn, sql), sql
            for sql in (
                "DELETE FROM alerts",
                "UPDATE pumps SET clinic = 'elsewhere'",
                "DELETE FROM telemetry",
                insert_telemetry.replace("$1", "2"),
                "SELECT payload FROM dead_letter",
            ):
                assert await _denied(conn, sql), sql
        finally:
            await conn.close()

    async with login(db_url, "pumpfleet_reader") as url:
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM telemetry") == 1
            assert await conn.fetchval("SELECT count(*) FROM quarantine_seen") == 0
            for sql in (
                insert_telemetry.replace("$1", "3"),
                "UPDATE alerts SET ended_at = now()",
                "DELETE FROM alert_history",
                "SELECT payload FROM dead_letter",
                *ddl,
            ):
                assert await _denied(conn, sql), sql
        finally:
            await conn.close()

    conn = await asyncpg.connect(db_url)
    try:
        phases = [r[0] for r in await conn.fetch("SELECT phase FROM alert_history ORDER BY id")]
        assert phases == ["start", "ack"]  # nothing rewritten, the acknowledgement appended
        assert await conn.fetchval("SELECT count(*) FROM telemetry") == 1
    finally:
        await conn.close()


# Hostile text -------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_hostile_text_is_stored_or_dead_lettered_verbatim_and_the_tables_are_intact(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any
) -> None:
    """No SQL is built from payload text: strings made to break out of a quoted literal, in
    pump ids, topics, status reasons and on-call names and notes, come back byte for byte."""
    pump = f"H-{uuid.uuid4().hex[:6]}"
    await provision(db_url, [pump])
    drop = "'); DROP TABLE telemetry; --"
    now = datetime.now(UTC).isoformat()

    def status(reason: str, seq: int) -> tuple[str, bytes]:
        body = {"v": 2, "pump_id": pump, "time": now, "seq": seq, "online": False, "reason": reason}
        return contract.topic(pump, "status"), json.dumps(body).encode()

    reasons = [drop, "x' OR '1'='1", 'Robert"); DELETE FROM pumps; --', "$1; TRUNCATE alerts"]
    stored = [status(r, n) for n, r in enumerate(reasons, 1)] + feed(pump, range(10))
    hostile = [
        (f"pumps/x{drop}/telemetry", telemetry("x", 1)),  # in the topic's pump id
        (contract.topic(pump, "telemetry"), telemetry(f"{pump}{drop}", 2)),  # in the payload's
        (contract.topic(pump, "telemetry"), telemetry(pump, 3, note=drop)),  # an unknown field
        (contract.topic(pump, "event"), json.dumps({"event": drop}).encode()),
        (contract.topic(pump, "telemetry"), drop.encode()),  # not JSON at all
        (f"pumps/{pump}/{drop}", b"{}"),  # in the kind
    ]
    async with (
        login(db_url, "pumpfleet_ingest") as ingest_url,
        running(settings_for(stack, ingest_url, client_ids())),
    ):
        await asyncio.to_thread(publish, stack, stored + hostile)

        async def landed() -> bool:
            return await scalar(
                db_url,
                "SELECT (SELECT count(*) FROM telemetry WHERE pump_id = $1) = 10 AND "
                "(SELECT count(*) FROM status_log WHERE pump_id = $1) = 4 AND "
                "(SELECT count(*) FROM dead_letter WHERE payload = ANY($2::bytea[])) = $3",
                pump,
                [p for _, p in hostile],
                len(hostile),
            )

        await until(landed, 30, "the statuses stored and the hostile messages dead-lettered")

    conn = await asyncpg.connect(db_url)
    try:
        got = [
            r[0]
            for r in await conn.fetch(
                "SELECT reason FROM status_log WHERE pump_id = $1 ORDER BY seq", pump
            )
        ]
        assert got == reasons
        dead = {
            (r["topic"], bytes(r["payload"]))
            for r in await conn.fetch("SELECT topic, payload FROM dead_letter")
        }
        assert set(hostile) <= dead
        assert (
            await conn.fetchval("SELECT count(*) FROM dead_letter WHERE pump_id = $1", f"x{drop}")
            == 1
        )

        # On-call text goes the same way: a name and a note that try to break out.
        done = await Book().apply(
            conn, [Finding(pump, "low_reservoir", True, "medium", datetime.now(UTC), drop, {})]
        )
        alert_id = done[0].alert.alert_id
        await acknowledge(conn, alert_id, f"nurse{drop}", note=reasons[1])
        row = await conn.fetchrow(
            "SELECT a.summary, a.acked_by, h.note FROM alerts a JOIN alert_history h "
            "USING (alert_id) WHERE a.alert_id = $1 AND h.phase = 'ack'",
            alert_id,
        )
        assert tuple(row) == (drop, f"nurse{drop}", reasons[1])

        tables = [
            *("pumps", "telemetry", "events", "pump_status", "status_log", "dead_letter"),
            *("alerts", "alert_history", "alert_outbox", "alert_feed", "alerting_lease"),
            "quarantine_seen",
        ]
        present = await conn.fetchval(
            "SELECT count(*) FROM unnest($1::text[]) t WHERE to_regclass(t) IS NOT NULL", tables
        )
        assert present == len(tables)
        assert await conn.fetchval("SELECT count(*) FROM pumps WHERE pump_id = $1", pump) == 1
        assert await conn.fetchval("SELECT count(*) FROM alerts") == 1
    finally:
        await conn.close()


@pytest.mark.integration
def test_the_roles_hold_on_timescaledb_too() -> None:
    """The same migrations on real TimescaleDB (the WebAssembly build of tests/test_schema.py):
    the ingest role writes a hypertable (a new chunk: created for it, not by it) and is refused
    DDL and history edits; the alerting role reads and cannot rewrite history."""
    from test_schema import _timescaledb

    attempt = """CREATE FUNCTION public.attempt(sql text) RETURNS text LANGUAGE plpgsql AS $$
    BEGIN
        EXECUTE sql;
        RETURN 'done';
    EXCEPTION WHEN insufficient_privilege THEN
        RETURN 'denied';
    END $$"""
    insert = (
        "INSERT INTO telemetry (time, pump_id, seq, delivered_ul_per_h, programmed_rate_ul_per_h,"
        " programmed_dose_mcg_per_day, reservoir_ml, reservoir_capacity_ml,"
        " low_reservoir_alarm_ml, concentration_mcg_per_ml, battery_pct, battery_eri, pump_state)"
        " VALUES (now(), 'P-1', 1, 10, 10, 500, 12, 20, 2, 2000, 80, false, 'infusing')"
    )
    statements = [m.sql for m in schema.migrations("timescaledb")] + [
        attempt,
        "INSERT INTO pumps (pump_id) VALUES ('P-1')",
        "INSERT INTO alerts (pump_id, rule, priority, phase, summary, started_at, updated_at)"
        " VALUES ('P-1', 'low_reservoir', 'medium', 'start', 'low', now(), now())",
        "INSERT INTO alert_history (alert_id, phase, priority) SELECT alert_id, 'start', priority"
        " FROM alerts",
    ]

    def tried(sql: str) -> str:
        return "SELECT public.attempt('" + sql.replace("'", "''") + "')"

    queries = {
        "as ingest": "SET ROLE pumpfleet_ingest",
        "ingest writes": tried(insert),
        "ingest stored": "SELECT count(*) FROM telemetry",
        "ingest ddl": tried("CREATE TABLE public.mine (x int)"),
        "ingest drops": tried("DROP TABLE telemetry"),
        "ingest history": tried("UPDATE alert_history SET note = 'x'"),
        "ingest deletes": tried("DELETE FROM telemetry"),
        "back": "RESET ROLE",
        "as alerting": "SET ROLE pumpfleet_alerting",
        "alerting reads": "SELECT count(*) FROM telemetry",
        "alerting appends": tried(
            "INSERT INTO alert_history (alert_id, phase, priority)"
            " SELECT alert_id, 'ack', priority FROM alerts"
        ),
        "alerting history": tried("DELETE FROM alert_history"),
        "alerting writes": tried(insert.replace("'P-1', 1", "'P-1', 2")),
        "again": "RESET ROLE",
        "chunks": "SELECT count(*) FROM timescaledb_information.chunks"
        " WHERE hypertable_name = 'telemetry'",
    }
    res = _timescaledb(statements, queries)["results"]

    def one(name: str) -> Any:
        return res[name]["rows"][0][0]

    assert one("ingest writes") == "done" and one("ingest stored") == 1 and one("chunks") == 1
    for name in ("ingest ddl", "ingest drops", "ingest history", "ingest deletes"):
        assert one(name) == "denied", name
    assert one("alerting reads") == 1 and one("alerting appends") == "done"
    assert one("alerting history") == "denied" and one("alerting writes") == "denied"
