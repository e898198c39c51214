"""Benchmark: pump telemetry through the real broker into the real database.

Everything runs on this machine: mosquitto, PostgreSQL, the publishers and the ingester. Prints,
from one run:
- raw limits: a bare paho subscriber acking a backlog (no validation, no database), and asyncpg
  unnest inserts of ready-made rows (no MQTT);
- backlog drain: the ingester alone draining a queued backlog, with full validation, dedup and
  ack-after-commit; its CPU and peak memory;
- the naive pipeline (paho callback, one INSERT per message, autocommit) on a smaller backlog;
- sustained load: publishers at a fixed rate while the ingester runs, with publish-to-commit
  latency percentiles from the database;
and counts loss and duplicates from the database every time.

    .venv/bin/python benchmarks/ingest_bench.py          # backlog 200,000; 60 s sustained
    .venv/bin/python benchmarks/ingest_bench.py --quick  # smaller, for a smoke check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
from _figures import record
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pumpfleet import contract, schema
from pumpfleet import stack as stack_mod
from pumpfleet.broker import BrokerOptions

_TICK = os.sysconf("SC_CLK_TCK")


# Load -------------------------------------------------------------------------------------------


def _payload(pump_id: str, seq: int, at: datetime) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "pump_id": pump_id,
            "time": at.isoformat(timespec="microseconds"),
            "seq": seq,
            "delivered_ul_per_h": 10.41,
            "programmed_rate_ul_per_h": 10.42,
            "programmed_dose_mcg_per_day": 500.0,
            "reservoir_ml": 15.0 - (seq % 1000) * 0.001,
            "reservoir_capacity_ml": 20.0,
            "low_reservoir_alarm_ml": 2.0,
            "concentration_mcg_per_ml": 2000.0,
            "battery_pct": 80.0,
            "battery_eri": False,
            "pump_state": "infusing",
            "alarms": [],
        }
    ).encode()


def _publisher(
    mqtt_url: str, worker: int, pumps: int, count: int, rate: float, seq0: int, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    """Publish `count` QoS 1 messages round-robin over this worker's pumps, at `rate`/s (0: max).
    `mqtt_url` carries an account that may publish (the stack's `mqtt_url_for("fleet")`)."""
    broker = BrokerOptions.from_url(mqtt_url)
    client = broker.paho_client(
        f"bench-pub-{worker}-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv311
    )
    client.max_inflight_messages_set(2000)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    ids = [f"W{worker:02d}-{p:05d}" for p in range(pumps)]
    infos = []
    start = time.perf_counter()
    base = datetime.now(UTC) - (timedelta(days=1) if rate == 0 else timedelta(0))
    for i in range(count):
        if rate:
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        pump = ids[i % pumps]
        seq = seq0 + i // pumps
        at = datetime.now(UTC) if rate else base + timedelta(microseconds=i)
        infos.append(client.publish(contract.topic(pump, "telemetry"), _payload(pump, seq, at), 1))
        if len(infos) >= 20_000:  # paho has 65,535 message ids: wait for the oldest
            infos[0].wait_for_publish(60)
            infos = [m for m in infos if not m.is_published()]
    for m in infos:
        m.wait_for_publish(120)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    out.put((worker, count, elapsed))


def publish(
    mqtt_url: str,
    total: int,
    workers: int,
    rate: float = 0.0,
    seq0: int = 0,
    pumps_per_worker: int = 250,
) -> float:
    """Publish from `workers` processes, logged in with `mqtt_url`'s account (the fleet's);
    return the acknowledged rate (msgs/s)."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    per = total // workers
    procs = [
        ctx.Process(
            target=_publisher, args=(mqtt_url, w, pumps_per_worker, per, rate / workers, seq0, out)
        )
        for w in range(workers)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - start
    acked = 0
    while not out.empty():
        acked += out.get()[1]
    if acked != per * workers:
        raise SystemExit(f"publishers acknowledged {acked} of {per * workers}")
    return acked / elapsed


# Processes and figures -------------------------------------------------------------------------


class Watched:
    """A child process whose CPU seconds and peak memory we read from /proc."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK

    def peak_rss_mb(self) -> float:
        return self._status_mb("VmHWM")

    def rss_mb(self) -> float:
        """Resident now (what it keeps), where peak_rss_mb includes start-up's high water."""
        return self._status_mb("VmRSS")

    def _status_mb(self, field: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def cpu_by_program() -> dict[str, float]:
    """CPU seconds so far of every mosquitto and postgres process on the machine."""
    out = {"mosquitto": 0.0, "postgres": 0.0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        if name in out:
            f = text.rsplit(")", 1)[1].split()
            out[name] += (int(f[11]) + int(f[12])) / _TICK
    return out


async def count_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM telemetry"))
    finally:
        await conn.close()


async def wait_count(dsn: str, n: int, timeout: float) -> float:
    """Wait until the telemetry table holds n rows; return when it first did (perf_counter)."""
    deadline = time.perf_counter() + timeout
    # A count of a million rows costs the database a core for a while: poll big tables less.
    pause = 0.05 if n <= 200_000 else 0.5
    conn = await asyncpg.connect(dsn)
    try:
        while time.perf_counter() < deadline:
            if await conn.fetchval("SELECT count(*) FROM telemetry") >= n:
                return time.perf_counter()
            await asyncio.sleep(pause)
    finally:
        await conn.close()
    raise SystemExit(f"timed out: fewer than {n} rows after {timeout}s")


async def loss_and_duplicates(dsn: str, expected: int) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM telemetry")
        distinct = await conn.fetchval("SELECT count(DISTINCT (pump_id, seq)) FROM telemetry")
    finally:
        await conn.close()
    return expected - distinct, rows - distinct


def ingester_env(info: stack_mod.StackInfo, dsn: str, client_id: str) -> dict[str, str]:
    return {
        **os.environ,
        **info.to_env(),
        "PUMPFLEET_DATABASE_URL": dsn,
        "PUMPFLEET_INGEST__CLIENT_ID": client_id,
        "PUMPFLEET_INGEST__METRICS_PORT": "0",
        "PUMPFLEET_LOG_LEVEL": "WARNING",
        # A lab: synthetic pumps, never provisioned, each sending far above a real pump's rate.
        "PUMPFLEET_INGEST__UNKNOWN_PUMPS": "register",
        "PUMPFLEET_INGEST__RATE_LIMIT_PER_S": "0",
    }


async def fresh_db(info: stack_mod.StackInfo, name: str) -> str:
    dsn = stack_mod.create_database(info, name)
    await schema.migrate(dsn)
    return dsn


def make_session(mqtt_url: str, client_id: str) -> None:
    """Create a persistent session subscribed to all telemetry, so a backlog queues for it;
    `mqtt_url` carries the account that will consume it (the stack's `mqtt_url_for("ingest")`)."""
    broker = BrokerOptions.from_url(mqtt_url)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c = broker.paho_client(client_id)
    granted = threading.Event()
    c.on_connect = lambda cl, *a: cl.subscribe(contract.subscription(), qos=1)
    c.on_subscribe = lambda *a: granted.set()
    c.connect(broker.host, broker.port, clean_start=False, properties=props)
    c.loop_start()
    if not granted.wait(10):
        raise SystemExit("broker did not grant the subscription")
    c.disconnect()
    c.loop_stop()


# Stages -----------------------------------------------------------------------------------------


def queued_backlog(
    info: stack_mod.StackInfo, n: int, workers: int, prefix: str
) -> tuple[str, BrokerOptions, Properties]:
    """n telemetry messages queued for a new persistent session of the ingest account: (its
    client id, the account's broker options, CONNECT properties that resume it with a window of
    20,000 and end it on disconnect)."""
    cid = f"{prefix}-{uuid.uuid4().hex[:6]}"
    make_session(info.mqtt_url_for("ingest"), cid)
    publish(info.mqtt_url_for("fleet"), n, workers)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    props.ReceiveMaximum = 20000
    return cid, BrokerOptions.from_url(info.mqtt_url_for("ingest")), props


def ingester_client(
    cls: type[mqtt.Client], cid: str, broker: BrokerOptions, **kwargs: Any
) -> mqtt.Client:
    """A client of the ingester's class (or an older one), logged in as the ingester logs in."""
    c = cls(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=cid,
        protocol=mqtt.MQTTv5,
        **kwargs,
    )
    if broker.username is not None:
        c.username_pw_set(broker.username, broker.password)
    if broker.tls:
        c.tls_set_context(broker.tls_context())
    return c


def bare_mqtt_drain(info: stack_mod.StackInfo, n: int, workers: int, buffered: bool) -> float:
    """The MQTT ceiling in Python: a paho subscriber that acks each message and does nothing
    (stock paho, or paho with the ingester's buffered socket)."""
    from ingest._mqtt import Client as BufferedClient

    cid, broker, props = queued_backlog(info, n, workers, "bench-bare")
    got = 0
    done = mp.Event()

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    c = ingester_client(BufferedClient, cid, broker) if buffered else broker.paho_client(cid)
    c.on_message = on_message
    start = time.perf_counter()
    c.connect(broker.host, broker.port, clean_start=False, properties=props)
    c.loop_start()
    done.wait(300)
    elapsed = time.perf_counter() - start
    c.disconnect()
    c.loop_stop()
    return got / elapsed


OLD_MQTT_REV = "56bed13"
"""The last commit whose ingest/mqtt.py framed packets through paho's internals (before mqtt5)."""


def mqtt_client_at(rev: str) -> type[mqtt.Client]:
    """The ingester's MQTT Client as it was at `rev`, loaded from git beside today's (the module
    is ingest/_mqtt.py since the parts' modules went private, ingest/mqtt.py before)."""
    for path in ("ingest/_mqtt.py", "ingest/mqtt.py"):
        shown = subprocess.run(
            ["git", "show", f"{rev}:{path}"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
        )
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"no ingest/_mqtt.py or ingest/mqtt.py at {rev}: {shown.stderr.strip()}")
    module = types.ModuleType(f"ingest_mqtt_at_{rev[:8]}")
    exec(compile(shown.stdout, f"{rev[:8]}:{path}", "exec"), module.__dict__)
    client: type[mqtt.Client] = module.Client
    return client


def raw_path_drain(
    info: stack_mod.StackInfo, n: int, workers: int, client_cls: type[mqtt.Client]
) -> float:
    """The ingester's own MQTT path without validation or database: QoS 1 PUBLISHes to
    `on_raw_message` on paho's thread, their PUBACKs batched by another thread (`ack_many`),
    as ingest/_service.py does after each commit."""
    import queue

    cid, broker, props = queued_backlog(info, n, workers, "bench-rawpath")
    c = ingester_client(client_cls, cid, broker, manual_ack=True)
    mids: queue.SimpleQueue[int] = queue.SimpleQueue()
    c.on_raw_message = lambda topic, payload, mid: mids.put(mid)  # type: ignore[attr-defined]
    c.on_message = lambda client, userdata, m: mids.put(m.mid)  # what the raw path leaves to paho
    got = 0

    def acker() -> None:
        nonlocal got
        while got < n:
            batch = [mids.get()]
            while len(batch) < 2000:
                try:
                    batch.append(mids.get_nowait())
                except queue.Empty:
                    break
            got += len(batch)
            c.ack_many(batch)  # type: ignore[attr-defined]

    ack_thread = threading.Thread(target=acker, daemon=True)
    start = time.perf_counter()
    c.connect(broker.host, broker.port, clean_start=False, properties=props)
    ack_thread.start()
    c.loop_start()
    ack_thread.join(300)
    elapsed = time.perf_counter() - start
    c.disconnect()
    c.loop_stop()
    if got < n:
        raise SystemExit(f"{client_cls.__module__}: {got:,} of {n:,} messages in {elapsed:.0f} s")
    return got / elapsed


async def bare_db_insert(info: stack_mod.StackInfo, n: int) -> float:
    """The database ceiling: asyncpg unnest batches of ready rows, dedup key and all."""
    from ingest._store import prepare, write_batch

    dsn = await fresh_db(info, f"bench_rawdb_{uuid.uuid4().hex[:6]}")
    now = datetime.now(UTC) - timedelta(days=30)
    msgs = [
        contract.decode(
            contract.topic(f"R-{i % 1000:05d}", "telemetry"),
            _payload(f"R-{i % 1000:05d}", i // 1000, now + timedelta(seconds=i)),
        )
        for i in range(n)
    ]
    conn = await asyncpg.connect(dsn)
    await prepare(conn)
    start = time.perf_counter()
    for i in range(0, n, 2000):
        await write_batch(conn, msgs[i : i + 2000], [])
    elapsed = time.perf_counter() - start
    await conn.close()
    return n / elapsed


async def bare_copy(info: stack_mod.StackInfo, n: int) -> float:
    """The database's own ceiling: COPY of ready rows straight into the same telemetry table
    (no staging, no dedup, no alert feed), in batches of 2,000 like the ingester's."""
    dsn = await fresh_db(info, f"bench_copy_{uuid.uuid4().hex[:6]}")
    now = datetime.now(UTC) - timedelta(days=30)
    conn = await asyncpg.connect(dsn)
    try:
        columns = [
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = "
                "'telemetry' AND column_default IS NULL AND column_name <> 'received_at' "
                "ORDER BY ordinal_position"
            )
        ]
        rows = []
        for i in range(n):
            pump = f"C-{i % 1000:05d}"
            m = contract.decode(
                contract.topic(pump, "telemetry"),
                _payload(pump, i // 1000, now + timedelta(seconds=i)),
            )
            values = [getattr(m, c) for c in columns]
            rows.append(tuple(getattr(v, "value", v) for v in values))
        start = time.perf_counter()
        for i in range(0, n, 2000):
            await conn.copy_records_to_table(
                "telemetry", columns=columns, records=rows[i : i + 2000]
            )
        elapsed = time.perf_counter() - start
    finally:
        await conn.close()
    return n / elapsed


def mosquitto_c_drain(info: stack_mod.StackInfo, n: int, workers: int) -> float:
    """The broker's own drain ceiling: mosquitto_sub (mosquitto's C client, QoS 1) resuming a
    persistent session that holds n queued telemetry messages, the same backlog the ingester
    drains (queued by the same publishers: mosquitto_pub -l leaves before its last
    acknowledgements, and lost about two thirds of 200,000 here). msg/s from its start to the
    n-th message; it stops after 5 s of silence and says how many came."""
    if shutil.which("mosquitto_sub") is None:
        raise SystemExit("mosquitto_sub missing: apt-get install mosquitto-clients")
    b = BrokerOptions.from_url(info.mqtt_url_for("ingest"))
    cid = f"bench-c-{uuid.uuid4().hex[:6]}"
    sub = ["mosquitto_sub", "-h", b.host, "-p", str(b.port), "-u", b.username or ""]
    sub += ["-P", b.password or "", "-q", "1", "-c", "-i", cid, "-t", contract.subscription()]
    subprocess.run([*sub, "-E"], check=True, timeout=30, stdout=subprocess.DEVNULL)
    publish(info.mqtt_url_for("fleet"), n, workers)
    start = last = time.perf_counter()
    receiver = subprocess.Popen([*sub, "-C", str(n)], stdout=subprocess.PIPE)
    assert receiver.stdout is not None
    got = 0
    sel = selectors.DefaultSelector()
    sel.register(receiver.stdout, selectors.EVENT_READ)
    try:
        while got < n and sel.select(5.0):
            chunk = receiver.stdout.read1(1 << 20)
            if not chunk:
                break
            got += chunk.count(b"\n")
            last = time.perf_counter()
    finally:
        receiver.kill()
        receiver.wait()
    if got < n:
        raise SystemExit(f"mosquitto_sub received {got:,} of the {n:,} queued messages")
    return got / (last - start)


async def ingester_drain(
    info: stack_mod.StackInfo, n: int, workers: int, workdir: Path, naive: bool = False
) -> dict[str, float]:
    """Queue n messages for a stopped ingester, then start it and time the drain."""
    name = "naive" if naive else "ingest"
    dsn = await fresh_db(info, f"bench_{name}_{uuid.uuid4().hex[:6]}")
    cid = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    make_session(info.mqtt_url_for("ingest"), cid)
    publish(info.mqtt_url_for("fleet"), n, workers)
    args = (
        [sys.executable, str(Path(__file__).with_name("naive_ingest.py"))]
        if naive
        else [sys.executable, "-m", "pumpfleet.cli", "ingest"]
    )
    start, others0 = time.perf_counter(), cpu_by_program()
    proc = Watched(args, ingester_env(info, dsn, cid), workdir / f"{name}.log")
    if os.environ.get("BENCH_PROFILE") and not naive:  # sample every thread with py-spy
        subprocess.Popen(
            [
                "py-spy",
                "record",
                "-p",
                str(proc.proc.pid),
                "-d",
                "6",
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                os.environ["BENCH_PROFILE"],
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        done = await wait_count(dsn, n, timeout=900)
        cpu, rss, others = proc.cpu_s(), proc.peak_rss_mb(), cpu_by_program()
    finally:
        proc.stop()
    elapsed = done - start
    loss, dup = await loss_and_duplicates(dsn, n)
    conn = await asyncpg.connect(dsn)
    try:  # first batch's transaction start to last batch's: the drain without process start-up
        span = await conn.fetchval(
            "SELECT extract(epoch FROM max(received_at) - min(received_at)) FROM telemetry"
        )
        first_batch = await conn.fetchval(
            "SELECT count(*) FROM telemetry WHERE received_at = (SELECT min(received_at) "
            "FROM telemetry)"
        )
    finally:
        await conn.close()
    return {
        "steady": (n - first_batch) / float(span) if span else 0.0,
        "rate": n / elapsed,
        "elapsed": elapsed,
        "cpu_pct": 100 * cpu / elapsed,
        "rss_mb": rss,
        "loss": loss,
        "dup": dup,
        "broker_pct": 100 * (others["mosquitto"] - others0["mosquitto"]) / elapsed,
        "db_pct": 100 * (others["postgres"] - others0["postgres"]) / elapsed,
    }


def _probe(mqtt_url: str, stop: threading.Event, sent: list[int]) -> None:
    """Latency probes: one pump's telemetry every 20 ms stamped with the wall clock
    (`mqtt_url`: the fleet account)."""
    broker = BrokerOptions.from_url(mqtt_url)
    client = broker.paho_client(f"bench-probe-{uuid.uuid4().hex[:6]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    infos = []
    while not stop.wait(0.02):
        seq = len(infos)
        infos.append(
            client.publish(
                contract.topic("PROBE-0001", "telemetry"),
                _payload("PROBE-0001", seq, datetime.now(UTC)),
                qos=1,
            )
        )
    for info in infos:
        info.wait_for_publish(60)
    sent.append(len(infos))
    client.disconnect()
    client.loop_stop()


async def sustained(
    info: stack_mod.StackInfo, rate: float, seconds: float, workdir: Path
) -> dict[str, float]:
    """`pumpfleet sim load` at `rate` while the ingester runs; latency from probe messages."""
    dsn = await fresh_db(info, f"bench_sustained_{uuid.uuid4().hex[:6]}")
    env = ingester_env(info, dsn, f"bench-sustained-{uuid.uuid4().hex[:6]}")
    port = stack_mod.free_port()
    env["PUMPFLEET_INGEST__METRICS_PORT"] = str(port)
    proc = Watched(
        [sys.executable, "-m", "pumpfleet.cli", "ingest"], env, workdir / "sustained.log"
    )
    try:
        await wait_healthy(port)
        cpu0, others0, t0 = proc.cpu_s(), cpu_by_program(), time.perf_counter()
        stop, probes = threading.Event(), []
        prober = threading.Thread(target=_probe, args=(info.mqtt_url_for("fleet"), stop, probes))
        prober.start()
        acked, achieved = await sim_load(info, env, 10_000, rate, seconds, workdir / "sim_load.txt")
        stop.set()
        await asyncio.to_thread(prober.join)
        total = acked + probes[0]
        await wait_count(dsn, total, timeout=120)
        elapsed = time.perf_counter() - t0
        cpu, rss, others = proc.cpu_s() - cpu0, proc.peak_rss_mb(), cpu_by_program()
    finally:
        proc.stop()
    loss, dup = await loss_and_duplicates(dsn, total)
    conn = await asyncpg.connect(dsn)
    try:
        p50, p99, pmax = await conn.fetchrow(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY l), "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY l), max(l) FROM "
            "(SELECT extract(epoch FROM received_at - time) AS l FROM telemetry "
            " WHERE pump_id = 'PROBE-0001') x"
        )
    finally:
        await conn.close()
    return {
        "offered": rate,
        "achieved": achieved,
        "p50": p50,
        "p99": p99,
        "max": pmax,
        "probes": probes[0],
        "cpu_pct": 100 * cpu / elapsed,
        "rss_mb": rss,
        "broker_pct": 100 * (others["mosquitto"] - others0["mosquitto"]) / elapsed,
        "db_pct": 100 * (others["postgres"] - others0["postgres"]) / elapsed,
        "loss": loss,
        "dup": dup,
        "n": total,
    }


async def sim_load(
    info: stack_mod.StackInfo,
    env: dict[str, str],
    pumps: int,
    rate: float,
    seconds: float,
    report_to: Path,
) -> tuple[int, float]:
    """`pumpfleet sim load` logged in as the fleet; its report goes to `report_to`. Returns
    (messages the broker acknowledged, acknowledged msg/s)."""
    load = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "pumpfleet.cli", "sim", "load", "--pumps", str(pumps)),
        *("--rate", str(rate), "--duration", str(seconds)),
        env={**env, "PUMPFLEET_MQTT__URL": info.mqtt_url_for("fleet")},  # a publisher
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await load.communicate()
    report = out.decode()
    report_to.write_text(report)
    acked = re.search(r"^acknowledged\s+([\d,]+)", report, re.M)
    achieved = re.search(r"acknowledged .*?, ([\d,]+) msg/s", report)
    if acked is None or achieved is None:
        raise SystemExit(f"sim load printed no acknowledged count: {report_to}")
    return int(acked[1].replace(",", "")), float(achieved[1].replace(",", ""))


async def wait_healthy(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            if (await reader.read()).startswith(b"HTTP/1.1 200"):
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"the service on port {port} did not become healthy in {timeout:.0f} s")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backlog", type=int, default=200_000)
    ap.add_argument("--naive", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=10_000)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--workers", type=int, default=4, help="publisher processes")
    ap.add_argument("--quick", action="store_true", help="backlog 20,000; 10 s sustained")
    ap.add_argument("--skip", default="", help="comma list: raw,drain,naive,sustained")
    ap.add_argument(
        "--old-mqtt-rev", default=OLD_MQTT_REV, help="git revision of the old MQTT path"
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side-by-side stage")
    args = ap.parse_args()
    if args.quick:
        args.backlog, args.naive, args.seconds = 20_000, 5_000, 10
    skip = set(args.skip.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="pumpfleet-bench-"))
    print(f"machine: {os.cpu_count()} cores; logs in {workdir}")
    with stack_mod.running_stack(workdir / "stack", purge=True) as info:
        res: dict[str, object] = {}
        if "raw" not in skip:
            res["stock_mqtt"] = bare_mqtt_drain(info, args.backlog, args.workers, False)
            print(f"raw: stock paho subscriber, ack only:  {res['stock_mqtt']:>9,.0f} msg/s")
            record(
                "raw.paho_stock", res["stock_mqtt"], "msg/s", what="stock paho subscriber, ack only"
            )
            res["bare_mqtt"] = bare_mqtt_drain(info, args.backlog, args.workers, True)
            print(f"raw: buffered paho subscriber, ack:    {res['bare_mqtt']:>9,.0f} msg/s")
            record("raw.paho_buffered", res["bare_mqtt"], "msg/s", what="paho, buffered socket")
            old_cls = mqtt_client_at(args.old_mqtt_rev)
            from ingest._mqtt import Client as NewClient

            sides = {
                "old": (old_cls, f"paho internals, {args.old_mqtt_rev}"),
                "new": (NewClient, "mqtt5"),
            }
            for rep in range(args.repeats):
                for label, (cls, what) in sides.items():
                    rate = raw_path_drain(info, args.backlog, args.workers, cls)
                    res.setdefault(f"raw_path_{label}", []).append(rate)  # type: ignore[union-attr]
                    print(f"raw: ingester MQTT path, {what}, run {rep + 1}: {rate:>9,.0f} msg/s")
                    record(
                        f"raw.mqtt_path_{label}", rate, "msg/s", what=f"ingester MQTT path, {what}"
                    )
            old_med = statistics.median(res["raw_path_old"])  # type: ignore[arg-type]
            new_med = statistics.median(res["raw_path_new"])  # type: ignore[arg-type]
            print(f"raw: ingester MQTT path, new / old (medians): {new_med / old_med:.2f}")
            res["bare_db"] = await bare_db_insert(info, args.backlog)
            print(f"raw: write_batch, ready rows (no MQTT): {res['bare_db']:>9,.0f} rows/s")
            record(
                "raw.write_batch", res["bare_db"], "rows/s", what="the ingester's write, no MQTT"
            )
            res["bare_copy"] = await bare_copy(info, args.backlog)
            print(f"raw: COPY into telemetry (no MQTT):    {res['bare_copy']:>9,.0f} rows/s")
            record("peer.copy", res["bare_copy"], "rows/s", what="COPY into the same table")
            res["mosquitto_c"] = mosquitto_c_drain(info, args.backlog, args.workers)
            print(f"raw: mosquitto_sub, QoS 1 drain:       {res['mosquitto_c']:>9,.0f} msg/s")
            what = "mosquitto_sub draining the queued backlog"
            record("peer.mosquitto_sub", res["mosquitto_c"], "msg/s", what=what)
        if "drain" not in skip:
            d = await ingester_drain(info, args.backlog, args.workers, workdir)
            res["drain"] = d
            record("drain.rate", d["rate"], "msg/s", what="backlog drain, from process start")
            record("drain.steady", d["steady"], "msg/s", what="backlog drain, first to last commit")
            record("drain.cpu_pct", d["cpu_pct"], "% of a core", "lower", what="ingester CPU")
            record("drain.rss_mb", d["rss_mb"], "MB", "lower", what="ingester peak RSS")
            record("drain.lost", d["loss"] + d["dup"], "messages", "lower", what="lost + doubled")
            print(
                f"backlog drain, {args.backlog:,} msgs:       {d['rate']:>9,.0f} msg/s "
                f"from process start, {d['steady']:,.0f} msg/s first to last commit "
                f"({d['elapsed']:.1f} s, ingester CPU {d['cpu_pct']:.0f} %, peak RSS "
                f"{d['rss_mb']:.0f} MB, loss {d['loss']:.0f}, duplicates {d['dup']:.0f}; "
                f"mosquitto CPU {d['broker_pct']:.0f} %, PostgreSQL CPU {d['db_pct']:.0f} %)"
            )
        if "naive" not in skip:
            nv = await ingester_drain(info, args.naive, args.workers, workdir, naive=True)
            res["naive"] = nv
            record("peer.naive", nv["rate"], "msg/s", what="naive ingester, one INSERT each")
            print(
                f"naive drain, {args.naive:,} msgs:          {nv['rate']:>9,.0f} msg/s "
                f"(CPU {nv['cpu_pct']:.0f} %, loss {nv['loss']:.0f}, dup {nv['dup']:.0f})"
            )
        if "sustained" not in skip:
            s = await sustained(info, args.rate, args.seconds, workdir)
            res["sustained"] = s
            record("sustained.acked", s["achieved"], "msg/s", what="sim load acknowledged")
            record("sustained.p50_ms", s["p50"] * 1000, "ms", "lower", what="publish-to-commit p50")
            record("sustained.p99_ms", s["p99"] * 1000, "ms", "lower", what="publish-to-commit p99")
            record("sustained.cpu_pct", s["cpu_pct"], "% of a core", "lower", what="ingester CPU")
            record(
                "sustained.lost", s["loss"] + s["dup"], "messages", "lower", what="lost + doubled"
            )
            print(
                f"sustained {s['offered']:,.0f} msg/s offered for {args.seconds:.0f} s by "
                f"`pumpfleet sim load` (10,000 pumps): acknowledged {s['achieved']:,.0f} msg/s; "
                f"publish-to-commit ({s['probes']:,} probes) p50 "
                f"{s['p50'] * 1000:.0f} ms, p99 {s['p99'] * 1000:.0f} ms, max "
                f"{s['max'] * 1000:.0f} ms; ingester CPU {s['cpu_pct']:.0f} %, peak RSS "
                f"{s['rss_mb']:.0f} MB; mosquitto CPU {s['broker_pct']:.0f} %, PostgreSQL CPU "
                f"{s['db_pct']:.0f} %; loss {s['loss']:.0f}, duplicates {s['dup']:.0f} "
                f"of {s['n']:,}"
            )
        d, nv = res.get("drain"), res.get("naive")
        if isinstance(d, dict) and isinstance(nv, dict):
            print(f"ratio: ingester / naive = {d['rate'] / nv['rate']:.1f}x")
        if isinstance(d, dict) and "bare_mqtt" in res:
            print(
                f"ratio: ingester / bare MQTT receive = {d['rate'] / res['bare_mqtt']:.2f}; "
                f"ingester / bare DB insert = {d['rate'] / res['bare_db']:.2f}"
            )


if __name__ == "__main__":
    asyncio.run(main())
