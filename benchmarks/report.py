"""`make bench`: every benchmark, each run several times, into one report (docs/benchmarks.md).

Each benchmark script prints its own figures and hands them to this report through
benchmarks/_figures.py (one JSON line per figure). This runs every suite `--repeats` times
(default 3), keeps each figure's min/median/max, computes our ratio to each peer measured in the
same run (the naive ingester, Node-RED, mosquitto's own C clients, COPY), and writes
- docs/benchmarks.json: every value of every run, with the machine and versions;
- docs/benchmarks.md: the report, rendered from that JSON;
- the figures block of README.md (between its `bench:` markers), rendered from the same JSON.

    .venv/bin/python benchmarks/report.py                  # everything, 3 repeats (about 1 h)
    .venv/bin/python benchmarks/report.py --only decode,ingest --repeats 1
    .venv/bin/python benchmarks/report.py --render         # re-render from docs/benchmarks.json

With --only, the suites not run keep their figures from the existing JSON (the report says when
each suite ran). Ctrl-C stops the running benchmark cleanly (its stack is taken down).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
JSON_OUT = REPO / "docs" / "benchmarks.json"
MD_OUT = REPO / "docs" / "benchmarks.md"
README = REPO / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Suite:
    name: str
    command: str  # the script and its arguments
    what: str
    repeats: int | None = None  # None: --repeats; 1 for a deterministic measurement


SUITES = (
    Suite("decode", "decode_bench.py", "decode and validate one telemetry payload"),
    Suite("rules", "rules_bench.py --pumps 10000 --hours 6", "the rule engine alone, 10,000 pumps"),
    Suite(
        "ingest",
        "ingest_bench.py --backlog 200000 --naive 20000 --seconds 30 --repeats 1",
        "raw limits, backlog drain, the naive ingester, sustained 10,000 msg/s",
    ),
    Suite("nodered", "nodered_bench.py --backlog 20000", "Node-RED draining the same backlog"),
    Suite(
        "load",
        "sim_load_bench.py --rates 20000 --duration 20 --pumps 10000",
        "the load generator's acknowledged rate",
    ),
    Suite(
        "alerts",
        "alert_latency_bench.py --pumps 10000 --rate 5000 --faults 40 --seconds 45",
        "fault to alert row and to Alertmanager under 10,000 pumps' load",
    ),
    Suite(
        "scale",
        "scale_bench.py --skip alarm --drain 200000",
        "one ingester and two on a shared subscription; alerting judging the feed",
    ),
    Suite(
        "recovery",
        "scale_bench.py --skip drain --alarm-backlog 1440000 --pumps 10000 --lanes on",
        "a 10,000-pump fleet's 24 h of store-and-forward backlog (144 readings each) replayed",
    ),
    Suite("cost", "cost_bench.py", "cost at 1,000 to 100,000 pumps"),
    Suite("storage", "storage_bench.py", "database bytes per pump-year", repeats=1),
)
QUICK = {  # --quick: the same figures from smaller runs, for a smoke check of the whole chain
    "rules": "rules_bench.py --pumps 1000 --hours 2",
    "ingest": "ingest_bench.py --quick --repeats 1",
    "nodered": "nodered_bench.py --backlog 5000",
    "load": "sim_load_bench.py --rates 5000 --duration 5 --pumps 2000",
    "alerts": "alert_latency_bench.py --pumps 2000 --rate 1000 --faults 10 --seconds 25",
    "scale": "scale_bench.py --skip alarm --drain 20000",
    "recovery": "scale_bench.py --skip drain --alarm-backlog 100000",
    "cost": "cost_bench.py --pumps 1000,5000 --rate 2000",
    "storage": "storage_bench.py --pumps 20 --days 7",
}

# Figure -> the peer it is compared with (ours / peer, medians of the same report run).
PEERS = (
    ("drain.rate", "peer.naive", "the naive ingester (one INSERT per message, autocommit)"),
    ("drain.steady", "peer.nodered", "Node-RED 4 (mqtt in -> function node -> pg INSERT)"),
    ("raw.mqtt_path_new", "peer.mosquitto_sub", "mosquitto_sub draining the same queued backlog"),
    ("drain.steady", "peer.mosquitto_sub", "mosquitto_sub (the broker's own drain limit)"),
    ("raw.write_batch", "peer.copy", "COPY of ready rows into the same table"),
    ("drain.steady", "peer.copy", "COPY (the database's own write limit)"),
    ("raw.mqtt_path_new", "raw.mqtt_path_old", "our MQTT path before mqtt5 (paho internals)"),
)

SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Decode and validate", ("decode.contract", "decode.orjson", "decode.json")),
    ("The rule engine alone", ("rules.observe_per_s", "rules.tick_ms", "rules.state_b_per_pump")),
    (
        "Backlog drain (200,000 queued messages: validate, dedup, store, ack after commit)",
        ("drain.rate", "drain.steady", "drain.cpu_pct", "drain.rss_mb", "drain.lost"),
    ),
    (
        "Sustained 10,000 msg/s from `pumpfleet sim load` (10,000 pumps)",
        (
            "sustained.acked",
            "sustained.p50_ms",
            "sustained.p99_ms",
            "sustained.cpu_pct",
            "sustained.lost",
        ),
    ),
    (
        "The load generator",
        ("load.acked_20000", "load.cpu_us_20000", "load.paho_baseline"),
    ),
    (
        "Fault to alert (motor stall under 10,000 pumps at 5,000 msg/s)",
        (
            "alert.row_p50_ms",
            "alert.row_p99_ms",
            "alert.am_p50_ms",
            "alert.am_p99_ms",
            "alert.row_missed",
            "alert.am_missed",
        ),
    ),
    (
        "Recovery after an outage (10,000 pumps' 24 h backlog, 1,440,000 messages)",
        (
            "recovery.on.drain_s",
            "recovery.on.row_s",
            "recovery.on.am_s",
            "recovery.off.drain_s",
            "recovery.off.row_s",
            "recovery.off.am_s",
        ),
    ),
    (
        "Scaling out and the alerting service",
        ("scale.one", "scale.two", "scale.judge", "scale.judge_cpu_us"),
    ),
    (
        "Raw limits and peers",
        (
            "raw.paho_stock",
            "raw.paho_buffered",
            "raw.mqtt_path_old",
            "raw.mqtt_path_new",
            "raw.write_batch",
            "peer.copy",
            "peer.mosquitto_sub",
            "peer.naive",
            "peer.nodered",
            "peer.nodered_lost",
        ),
    ),
    (
        "Storage",
        (
            "storage.pg.bytes_per_row",
            "storage.pg.mb_per_pump_year",
            "storage.tsdb.mb_per_pump_year",
            "storage.tsdb.compressed_mb_per_pump_year",
            "storage.tsdb.compression_ratio",
        ),
    ),
)
LABELS = {  # clearer words than a script recorded for its figure
    "recovery.on.drain_s": "the whole backlog stored, from the ingester's start",
    "recovery.on.row_s": "motor stall published mid-replay -> alert row",
    "recovery.on.am_s": "motor stall published mid-replay -> Alertmanager",
    "recovery.off.drain_s": "urgent lane off: the whole backlog stored",
    "recovery.off.row_s": "urgent lane off: motor stall -> alert row",
    "recovery.off.am_s": "urgent lane off: motor stall -> Alertmanager",
}
COST_COLUMNS = (
    ("stored", "stored msg/s"),
    ("ingest_us", "ingester µs CPU/msg"),
    ("alerting_us", "alerting µs CPU/msg"),
    ("ingest_mb", "ingester MB"),
    ("alerting_mb", "alerting MB"),
    ("ingest_b_per_pump", "ingester B/pump"),
    ("alerting_b_per_pump", "alerting B/pump"),
    ("lost", "lost"),
)

# Shown in README.md: (figure, how README words it).
README_FIGURES = (
    ("drain.steady", "backlog drain (validate, dedup, store, ack after commit)"),
    ("sustained.p99_ms", "publish-to-commit p99 at 10,000 msg/s"),
    ("alert.am_p99_ms", "motor stall to Alertmanager p99 under 10,000 pumps' load"),
    ("recovery.on.am_s", "motor stall to Alertmanager while a 24 h backlog replays"),
    ("load.acked_20000", "load generator, QoS 1 acknowledged"),
    ("storage.pg.mb_per_pump_year", "telemetry per pump-year, plain PostgreSQL"),
)


# Running -----------------------------------------------------------------------------------------


def _stop_child(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C for the benchmark: its `with running_stack(...)` takes the stack down."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_suite(suite: Suite, args: tuple[str, ...], log: Path) -> list[dict[str, Any]]:
    """One run of one suite: its figures (the JSON lines it recorded)."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as f:
        out = Path(f.name)
    env = {**os.environ, "PUMPFLEET_BENCH_JSON": str(out), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(HERE / args[0]), *args[1:]]
    with log.open("ab") as sink:
        sink.write(f"\n$ {' '.join(cmd)}\n".encode())
        sink.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            rc = proc.wait()
        except BaseException:
            _stop_child(proc)
            raise
    lines = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    out.unlink()
    if rc != 0:
        raise SystemExit(f"benchmark {suite.name} failed (exit {rc}); its output is in {log}")
    return lines


def machine() -> dict[str, Any]:
    def first_line(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "not found"
        return (
            (done.stdout or done.stderr).strip().splitlines()[0]
            if done.stdout or done.stderr
            else ""
        )

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    pg = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    packages = ("paho-mqtt", "aiomqtt", "mqtt5", "asyncpg", "pydantic", "orjson", "tenacity")
    red = HERE / "nodered" / "node_modules" / "node-red" / "package.json"
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "mosquitto": first_line(["/usr/sbin/mosquitto", "-h"]),
        "postgresql": first_line([str(pg[-1]), "--version"]) if pg else "not found",
        "node": first_line(["node", "-v"]),
        "node-red": json.loads(red.read_text())["version"] if red.exists() else "not installed",
        "packages": {p: _version(p) for p in packages},
        "pumpfleet": rev or "unknown",
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


# Rendering ---------------------------------------------------------------------------------------


def _figures(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """key -> {values, unit, better, what} over every run of every suite."""
    out: dict[str, dict[str, Any]] = {}
    for suite in data["suites"].values():
        for run in suite["runs"]:
            for f in run:
                what = LABELS.get(f["key"], f["what"])
                slot = out.setdefault(
                    f["key"], {"values": [], "unit": f["unit"], "better": f["better"], "what": what}
                )
                slot["values"].append(f["value"])
    return out


def _num(v: float) -> str:
    if v != v:  # NaN
        return "n/a"
    a = abs(v)
    if a >= 1000:
        text = f"{v:,.0f}"
    elif a >= 100:
        text = f"{v:.0f}"
    elif a >= 10:
        text = f"{v:.1f}"
    else:
        text = f"{v:.2f}"
    return text


def median(fig: dict[str, Any]) -> float:
    return float(statistics.median(fig["values"]))


def render(data: dict[str, Any]) -> str:
    figs = _figures(data)
    m = data["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (benchmarks/report.py) from docs/benchmarks.json; do not edit by "
        "hand. Every figure is measured on one machine, everything on it at once (broker, "
        "database, publishers, the services): the ratios, measured in the same run, travel "
        "better than the absolute figures.",
        "",
        f"- When: {data['finished']} (pumpfleet {m['pumpfleet']}); profile: {data['profile']}",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}",
        f"- Versions: Python {m['python']}; {m['mosquitto']}; {m['postgresql']}; "
        f"Node.js {m['node']}, Node-RED {m['node-red']}; "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        "",
        "Each figure: min / median / max over the runs (n). Suites and how each was run:",
        "",
        "| suite | what | command | runs | when |",
        "|---|---|---|---:|---|",
    ]
    for name, s in data["suites"].items():
        cmd = "`python benchmarks/" + " ".join(s["args"]) + "`"
        lines.append(f"| {name} | {s['what']} | {cmd} | {len(s['runs'])} | {s['finished']} |")
    lines += ["", "## Ours against the peers", ""]
    lines += [
        "| ours | peer | ours (median) | peer (median) | ours / peer |",
        "|---|---|---:|---:|---:|",
    ]
    for ours, peer, label in PEERS:
        if ours in figs and peer in figs:
            a, b = median(figs[ours]), median(figs[peer])
            lines.append(
                f"| {figs[ours]['what']} | {label} | {_num(a)} {figs[ours]['unit']} | "
                f"{_num(b)} {figs[peer]['unit']} | {a / b:.2f} |"
            )
    for title, keys in SECTIONS:
        present = [k for k in keys if k in figs]
        if not present:
            continue
        lines += ["", f"## {title}", "", "| figure | min | median | max | unit | n |"]
        lines.append("|---|---:|---:|---:|---|---:|")
        for k in present:
            f = figs[k]
            v = f["values"]
            lines.append(
                f"| {f['what']} (`{k}`) | {_num(min(v))} | {_num(median(f))} | {_num(max(v))} | "
                f"{f['unit']}{' (lower is better)' if f['better'] == 'lower' else ''} | {len(v)} |"
            )
    sizes = sorted({int(k.split(".")[1]) for k in figs if k.startswith("cost.")})
    if sizes:
        lines += [
            "",
            "## How cost grows with the fleet",
            "",
            "`pumpfleet sim load` at one fixed rate at every size, so only the number of pumps "
            "changes; medians over the runs. B/pump: resident memory added per pump from the "
            "previous size (the per-pump state, start-up excluded).",
            "",
            "| pumps | " + " | ".join(label for _, label in COST_COLUMNS) + " |",
            "|---:|" + "---:|" * len(COST_COLUMNS),
        ]
        for n in sizes:
            cells = []
            for col, _ in COST_COLUMNS:
                f = figs.get(f"cost.{n}.{col}")
                cells.append(_num(median(f)) if f else "-")
            lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Reading the figures",
        "",
        "- Peers do less than we do: the naive ingester and Node-RED validate nothing beyond JSON "
        "parsing, and Node-RED acknowledges each message before its INSERT (a crash loses what "
        "was in flight); ours validates, dedups, writes the alerting feed and acknowledges after "
        "the commit. mosquitto_sub and COPY do no work at all with the messages: they are the "
        "ceilings of the broker and of the database on this machine (mosquitto_sub still writes "
        "every payload to a pipe, which our bare MQTT path, handing each to a queue, does not).",
        "- Cost: the alerting service keeps each pump's rule state (trend windows, latches) in "
        "memory, about 10 kB a pump here: 100,000 pumps need about 1 GB, the figure to size its "
        "host by; the ingester keeps almost nothing per pump.",
        "- Recovery: the backlog is what 10,000 pumps' agents hold after 24 h offline (one reading "
        "each 10 min); the motor stall is published while it replays, and the urgent lane "
        "(a second MQTT session for events) is what keeps the alarm ahead of it.",
        "- Storage: bytes per pump-year of telemetry (one reading each 600 s, 52,560 a year), on "
        "plain PostgreSQL here; TimescaleDB figures come from its PGlite (WASM) build, since this "
        "machine has no native TimescaleDB.",
        "",
    ]
    return "\n".join(lines)


def readme_block(data: dict[str, Any]) -> str:
    figs = _figures(data)
    m = data["machine"]
    rows = [
        START,
        f"Measured by `make bench` on {m['cores']} cores, everything on one machine "
        f"({data['finished'][:10]}; medians, full report in [docs/benchmarks.md]"
        "(docs/benchmarks.md)):",
        "",
        "| figure | median |",
        "|---|---:|",
    ]
    for key, label in README_FIGURES:
        if key in figs:
            rows.append(f"| {label} | {_num(median(figs[key]))} {figs[key]['unit']} |")
    for ours, peer, label in PEERS[:2]:
        if ours in figs and peer in figs:
            ratio = median(figs[ours]) / median(figs[peer])
            rows.append(f"| ours / {label.split(' (')[0]} | {ratio:.1f}x |")
    rows.append(END)
    return "\n".join(rows)


def write_readme(data: dict[str, Any]) -> None:
    text = README.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {START} ... {END} block to fill")
    README.write_text(pattern.sub(lambda _: readme_block(data), text))


def write_all(data: dict[str, Any]) -> None:
    JSON_OUT.write_text(json.dumps(data, indent=1) + "\n")
    MD_OUT.write_text(render(data))
    write_readme(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each suite (3)")
    ap.add_argument(
        "--only", default="", help="comma list of suites: " + ",".join(s.name for s in SUITES)
    )
    ap.add_argument("--quick", action="store_true", help="smaller runs, for a smoke check")
    ap.add_argument(
        "--render", action="store_true", help="only re-render from docs/benchmarks.json"
    )
    args = ap.parse_args()
    if args.render:
        if not JSON_OUT.exists():
            raise SystemExit(f"{JSON_OUT} missing: run `make bench` first")
        write_all(json.loads(JSON_OUT.read_text()))
        print(f"wrote {MD_OUT.relative_to(REPO)} and README.md's figures")
        return 0
    names = [n for n in args.only.split(",") if n]
    known = {s.name for s in SUITES}
    if unknown := [n for n in names if n not in known]:
        raise SystemExit(
            f"unknown suite {', '.join(unknown)}: choose from {', '.join(sorted(known))}"
        )
    chosen = [s for s in SUITES if not names or s.name in names]
    data: dict[str, Any] = {"suites": {}}
    if names and JSON_OUT.exists():
        data = json.loads(JSON_OUT.read_text())
    profile = "quick (smaller runs)" if args.quick else "full"
    log = Path(tempfile.mkdtemp(prefix="pumpfleet-bench-report-")) / "bench.log"
    print(f"{len(chosen)} suites x {args.repeats} runs; each run's output in {log}")
    t0 = time.monotonic()
    failed: list[str] = []
    try:
        for suite in chosen:
            cmd = tuple(
                (QUICK.get(suite.name, suite.command) if args.quick else suite.command).split()
            )
            repeats = suite.repeats or args.repeats
            runs = []
            for i in range(repeats):
                started = time.monotonic()
                print(
                    f"[{time.monotonic() - t0:6.0f}s] {suite.name} run {i + 1}/{repeats} ...",
                    flush=True,
                )
                try:
                    runs.append(run_suite(suite, cmd, log))
                except SystemExit as exc:  # the others still run; this one keeps its old figures
                    failed.append(f"{suite.name}: {exc}")
                    print(f"          FAILED: {exc}", flush=True)
                    break
                print(
                    f"          {len(runs[-1])} figures in {time.monotonic() - started:.0f} s",
                    flush=True,
                )
            if len(runs) < repeats:
                continue
            data["suites"][suite.name] = {
                "args": list(cmd),
                "what": suite.what,
                "runs": runs,
                "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            }
    except KeyboardInterrupt:
        print("stopped; nothing written", file=sys.stderr)
        return 130
    data["suites"] = {s.name: data["suites"][s.name] for s in SUITES if s.name in data["suites"]}
    data["machine"] = machine()
    data["profile"] = profile if not names else f"{profile}; this run: {', '.join(names)}"
    data["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    write_all(data)
    print(
        f"wrote {MD_OUT.relative_to(REPO)}, {JSON_OUT.relative_to(REPO)} and README.md's figures "
        f"in {time.monotonic() - t0:.0f} s"
    )
    for line in failed:
        print(f"not updated, failed: {line} (BENCH_ONLY=<suite> make bench runs it again)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
