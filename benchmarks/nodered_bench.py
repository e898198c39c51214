"""Peer benchmark: Node-RED, the tool many users would pick for this job, draining the same
queued backlog into the same table on this machine's real mosquitto and PostgreSQL.

The flow is what a Node-RED user would build: an `mqtt in` node (QoS 1, a persistent MQTT 5
session) into a function node that INSERTs each message with the npm `pg` module (a pool of
10 connections, autocommit). Node-RED 4 and pg come from benchmarks/nodered/package.json
(`npm ci` there; this script runs it when node_modules is missing). No validation beyond JSON
parsing, and the mqtt node acknowledges each message on receipt, before its INSERT: a crash
loses what was in flight. Our ingester validates, dedups and acknowledges after commit.

    .venv/bin/python benchmarks/nodered_bench.py [--backlog 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
from _figures import record

sys.path.insert(0, str(Path(__file__).parent))
from ingest_bench import (
    Watched,
    fresh_db,
    loss_and_duplicates,
    make_session,
    publish,
    wait_count,
)
from naive_ingest import FIELDS as _FIELDS

from pumpfleet import contract
from pumpfleet import stack as stack_mod
from pumpfleet.broker import BrokerOptions

HERE = Path(__file__).resolve().parent / "nodered"
RED = HERE / "node_modules" / "node-red" / "red.js"
PG = HERE / "node_modules" / "pg"

_SQL = (
    f"INSERT INTO telemetry ({', '.join(_FIELDS)}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(_FIELDS)))}) ON CONFLICT DO NOTHING"
)

_ON_START = """const pg = global.get('pg');
context.set('pool', new pg.Pool({ connectionString: env.get('PEER_DATABASE_URL') }));"""
_ON_MESSAGE = f"""const b = msg.payload;
context.get('pool')
    .query({json.dumps(_SQL)}, [{", ".join(f"b.{f}" for f in _FIELDS)}])
    .then(() => node.done())
    .catch((err) => node.error(err.message, msg));
return null;"""
_ON_STOP = "const pool = context.get('pool'); if (pool) { pool.end(); }"


def ensure_installed() -> None:
    if RED.exists() and (HERE / "node_modules" / "pg").exists():
        return
    if shutil.which("npm") is None:
        raise SystemExit("nodered_bench: npm not found: install Node.js 20 and npm (apt-get)")
    print("installing Node-RED and pg (npm ci in benchmarks/nodered)...", file=sys.stderr)
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE)
    if done.returncode != 0:  # npm has said why above
        raise SystemExit(
            f"nodered_bench: `npm ci` in {HERE} failed (exit {done.returncode}): check the "
            "network to the npm registry, then run it again"
        )


def node_red_version() -> str:
    return str(json.loads((HERE / "node_modules/node-red/package.json").read_text())["version"])


def write_flow(user_dir: Path, mqtt_url: str, client_id: str) -> Path:
    """The flow, its credentials and Node-RED's settings in `user_dir`. The broker node logs in
    with `mqtt_url`'s account (the stack's `mqtt_url_for("ingest")`): Node-RED keeps a node's
    credentials apart from the flow, in `flows_cred.json` beside `flows.json`, keyed by node id;
    `credentialSecret: false` in the settings leaves that file plain JSON, as written here."""
    broker = BrokerOptions.from_url(mqtt_url)
    if broker.tls:
        raise SystemExit(
            f"nodered_bench: plain mqtt:// only (the flow has no TLS), not {broker.url}"
        )
    flows = [
        {"id": "tab", "type": "tab", "label": "pumps"},
        {
            "id": "broker",
            "type": "mqtt-broker",
            "name": "mosquitto",
            "broker": broker.host,
            "port": str(broker.port),
            "clientid": client_id,
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": "5",
            "keepalive": "60",
            "cleansession": False,
            "sessionExpiry": "3600",
        },
        {
            "id": "in",
            "type": "mqtt in",
            "z": "tab",
            "topic": contract.subscription(),
            "qos": "1",
            "datatype": "json",
            "broker": "broker",
            "nl": False,
            "rap": True,
            "rh": 0,
            "inputs": 0,
            "wires": [["insert"]],
        },
        {
            "id": "insert",
            "type": "function",
            "z": "tab",
            "name": "INSERT into telemetry",
            "func": _ON_MESSAGE,
            "initialize": _ON_START,
            "finalize": _ON_STOP,
            "outputs": 0,
            "wires": [],
        },
    ]
    (user_dir / "flows.json").write_text(json.dumps(flows, indent=2))
    credentials = {"broker": {"user": broker.username or "", "password": broker.password or ""}}
    cred_file = user_dir / "flows_cred.json"
    cred_file.touch(mode=0o600)
    cred_file.write_text(json.dumps(credentials, indent=2))
    settings = user_dir / "settings.js"
    settings.write_text(
        "module.exports = {\n"
        f"  flowFile: {json.dumps(str(user_dir / 'flows.json'))},\n"
        f"  userDir: {json.dumps(str(user_dir))},\n"
        "  uiHost: '127.0.0.1',\n"
        "  uiPort: 0,\n"
        "  credentialSecret: false,\n"
        "  httpAdminRoot: false,\n"
        "  httpNodeRoot: false,\n"
        f"  functionGlobalContext: {{ pg: require({json.dumps(str(PG))}) }},\n"
        "  logging: { console: { level: 'warn', metrics: false, audit: false } },\n"
        "};\n"
    )
    return settings


async def drain(info: stack_mod.StackInfo, n: int, workers: int, workdir: Path) -> dict[str, float]:
    """Queue n messages for Node-RED's session, start Node-RED, time until n rows."""
    dsn = await fresh_db(info, f"bench_nodered_{uuid.uuid4().hex[:6]}")
    cid = f"bench-nodered-{uuid.uuid4().hex[:6]}"
    make_session(info.mqtt_url_for("ingest"), cid)
    publish(info.mqtt_url_for("fleet"), n, workers)
    user_dir = Path(tempfile.mkdtemp(prefix="nodered-", dir=workdir))
    settings = write_flow(user_dir, info.mqtt_url_for("ingest"), cid)
    env = {"PATH": "/usr/bin:/bin", "PEER_DATABASE_URL": dsn, "HOME": str(user_dir)}
    start = time.perf_counter()
    proc = Watched(
        ["node", str(RED), "--settings", str(settings), "--userDir", str(user_dir)],
        env,
        workdir / "nodered.log",
    )
    try:
        done = await wait_count(dsn, n, timeout=900)
        cpu, rss = proc.cpu_s(), proc.peak_rss_mb()
    finally:
        proc.stop()
    elapsed = done - start
    loss, dup = await loss_and_duplicates(dsn, n)
    conn = await asyncpg.connect(dsn)
    try:  # first insert to last: the drain without Node-RED's start-up
        span = await conn.fetchval(
            "SELECT extract(epoch FROM max(received_at) - min(received_at)) FROM telemetry"
        )
    finally:
        await conn.close()
    return {
        "steady": (n - 1) / float(span) if span else 0.0,
        "rate": n / elapsed,
        "cpu_pct": 100 * cpu / elapsed,
        "rss_mb": rss,
        "loss": loss,
        "dup": dup,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backlog", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=4, help="publisher processes")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    ensure_installed()
    workdir = Path(tempfile.mkdtemp(prefix="pumpfleet-nodered-bench-"))
    node = subprocess.check_output(["node", "-v"], text=True).strip()
    print(f"Node-RED {node_red_version()} (node {node}); logs in {workdir}")
    runs = []
    with stack_mod.running_stack(workdir / "stack", purge=True) as info:
        for _ in range(args.repeat):
            r = await drain(info, args.backlog, args.workers, workdir)
            runs.append(r)
            record(
                "peer.nodered", r["steady"], "msg/s", what="Node-RED drain, first to last insert"
            )
            record("peer.nodered_lost", r["loss"] + r["dup"], "messages", "lower", "lost + doubled")
            print(
                f"  Node-RED drain of {args.backlog:,}: {r['steady']:,.0f} msg/s steady "
                f"({r['rate']:,.0f} with start-up), CPU {r['cpu_pct']:.0f} %, "
                f"RSS {r['rss_mb']:.0f} MB, loss {r['loss']:.0f}, dup {r['dup']:.0f}"
            )
    if args.repeat > 1:
        v = sorted(r["steady"] for r in runs)
        print(
            f"Node-RED steady drain over {args.repeat} runs: min {v[0]:,.0f}, "
            f"median {statistics.median(v):,.0f}, max {v[-1]:,.0f} msg/s"
        )


if __name__ == "__main__":
    asyncio.run(main())
