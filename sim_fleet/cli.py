"""`pumpfleet sim run|load|list`: scenarios through the real broker, and the benchmark load."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, TextIO

from pumpfleet.broker import BrokerConfigError, BrokerOptions
from pumpfleet.cli import UsageError
from pumpfleet.settings import Settings
from sim_fleet import check as checking
from sim_fleet import detect as detecting
from sim_fleet.fleet import FleetMix
from sim_fleet.load import LoadConfig, LoadReport, Progress, run_load
from sim_fleet.mqtt import ConnectError
from sim_fleet.run import RunOptions, RunProgress, RunStats, run_scenario
from sim_fleet.scenario import (
    ScenarioError,
    SimRun,
    build_run,
    builtin_scenarios,
    load_scenario,
)

log = logging.getLogger("sim_fleet")


def register(subparsers: Any) -> None:
    sim = subparsers.add_parser(
        "sim", help="fleet simulator: run scenarios, generate benchmark load"
    ).add_subparsers(required=True, metavar="ACTION")

    text = "run a scenario's fleet through the MQTT broker, paced in simulated time"
    p: argparse.ArgumentParser = sim.add_parser("run", help=text, description=text)
    p.add_argument("scenario", help="a shipped scenario's name (see `sim list`) or a YAML file")
    p.add_argument(
        "--speed",
        type=_speed,
        default=None,
        help="simulated seconds per wall second, or max (default: the scenario's)",
    )
    p.add_argument(
        "--pumps-per-connection",
        type=int,
        default=RunOptions.pumps_per_connection,
        metavar="N",
        help=f"pumps sharing one MQTT connection (default {RunOptions.pumps_per_connection})",
    )
    p.add_argument(
        "--inflight",
        type=int,
        default=RunOptions.inflight,
        metavar="N",
        help=f"unacknowledged publishes per connection (default {RunOptions.inflight})",
    )
    p.add_argument(
        "--seq-start",
        type=int,
        default=None,
        metavar="N",
        help="first seq of every pump (default: the start time in microseconds, so seqs "
        "keep rising across runs)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="afterwards, read the alerts table and check the scenario's expected alerts",
    )
    p.add_argument(
        "--check-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="how long to wait for the expected alerts (default 120)",
    )
    p.set_defaults(handler=sim_run)

    text = "benchmark load: contract-valid telemetry from many pumps at a fixed rate"
    p = sim.add_parser("load", help=text, description=text)
    d = LoadConfig()
    p.add_argument("--pumps", type=int, default=d.pumps, help=f"simulated pumps ({d.pumps})")
    p.add_argument("--rate", type=float, default=d.rate, help=f"messages per second ({d.rate:g})")
    p.add_argument(
        "--duration", type=float, default=d.duration_s, help=f"seconds ({d.duration_s:g})"
    )
    p.add_argument(
        "--processes", type=int, default=d.processes, help=f"worker processes ({d.processes})"
    )
    p.add_argument(
        "--connections",
        type=int,
        default=d.connections,
        help=f"MQTT connections per process ({d.connections})",
    )
    p.add_argument("--qos", type=int, choices=(0, 1), default=d.qos, help=f"({d.qos})")
    p.add_argument(
        "--inflight",
        type=int,
        default=d.inflight,
        help=f"unacknowledged publishes per connection, at most 65535 ({d.inflight})",
    )
    p.add_argument(
        "--interval",
        type=int,
        default=d.interval_s,
        help=f"simulated reporting interval in s: device time step per message ({d.interval_s})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"fleet seed ({d.seed})")
    p.add_argument(
        "--id-prefix", default=d.id_prefix, help=f"pump ids are PREFIX-000001... ({d.id_prefix})"
    )
    p.add_argument(
        "--seq-start",
        type=int,
        default=None,
        help="first seq of every pump (default: the start time in microseconds)",
    )
    p.set_defaults(handler=sim_load)

    text = "list the shipped scenarios"
    p = sim.add_parser("list", help=text, description=text)
    p.set_defaults(handler=sim_list)

    text = "write a scenario's pumps into the registry as their clinic would (profiles)"
    p = sim.add_parser("register", help=text, description=text)
    p.add_argument("scenario", help="a shipped scenario's name (see `sim list`) or a YAML file")
    p.set_defaults(handler=sim_register)

    text = (
        "print the detection table: each fault on each pump family, straight into the rule "
        "engine: detected or not, by which rule, priority, and time from onset to alert"
    )
    p = sim.add_parser("detect", help=text, description=text)
    p.add_argument(
        "--family",
        action="append",
        choices=detecting.FAMILIES,
        help="only this pump family (repeatable; default: all)",
    )
    p.add_argument("--seed", type=int, default=1, help="the pumps' random seed (default 1)")
    p.set_defaults(handler=sim_detect)

    text = (
        "run a healthy mixed fleet for a simulated year through the rule engine and count the "
        "alerts by rule; exit status 1 if any alert is one a healthy fleet should not raise"
    )
    p = sim.add_parser("year", help=text, description=text)
    p.add_argument("--pumps", type=_positive, default=1000, help="fleet size (default 1000)")
    p.add_argument("--days", type=_positive, default=365, help="simulated days (default 365)")
    p.add_argument("--seed", type=int, default=1, help="the fleet's random seed (default 1)")
    p.add_argument(
        "--interval",
        type=_positive,
        default=600,
        help="every pump's reporting interval in seconds (default 600)",
    )
    p.add_argument(
        "--processes", type=_positive, default=1, help="split the fleet over N processes"
    )
    p.set_defaults(handler=sim_year)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _speed(text: str) -> float | str:
    if text == "max":
        return "max"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or max") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _broker(settings: Settings, name: str) -> BrokerOptions:
    try:
        broker = BrokerOptions.from_settings(settings.mqtt, name)
        if broker.tls:
            broker.tls_context()  # unusable TLS files: a configuration error, not a retry
    except BrokerConfigError as exc:
        raise UsageError(str(exc)) from None
    return broker


class _Line:
    """A live status line: rewritten in place on a terminal, a log line every 10 s otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._logged = time.monotonic()
        self._shown = False

    def show(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self.stream.flush()
            self._shown = True
        elif time.monotonic() - self._logged >= 10:
            self._logged = time.monotonic()
            log.info("progress", extra={"status": text})

    def done(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


@contextmanager
def _stop_on_signals() -> Iterator[list[bool]]:
    """SIGINT/SIGTERM set a flag (the run ends early with its report) instead of killing it."""
    flag = [False]

    def stop(signum: int, frame: FrameType | None) -> None:
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# sim run ----------------------------------------------------------------------------------------


def sim_run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        scenario = load_scenario(args.scenario)
        if args.speed is not None:
            scenario = scenario.model_copy(update={"speed": args.speed})
        run = build_run(scenario)
    except ScenarioError as exc:
        raise UsageError(str(exc)) from None
    if args.pumps_per_connection < 1 or not 1 <= args.inflight <= 65_535:
        raise UsageError("--pumps-per-connection must be >= 1 and --inflight in 1..65535")
    broker = _broker(settings, "sim")
    dsn = settings.database_url.get_secret_value()
    baseline = 0
    if args.check:  # before the run: a database problem should not wait for a long run
        baseline = _db(checking.alert_baseline(dsn))
    options = RunOptions(
        pumps_per_connection=args.pumps_per_connection,
        inflight=args.inflight,
        seq_start=args.seq_start,
    )
    log.info(
        "sim run starting",
        extra={
            "scenario": scenario.name,
            "pumps": len(run.pumps),
            "start": run.start.isoformat(),
            "end": run.end.isoformat(),
            "speed": scenario.speed,
            "broker": broker.url,
        },
    )
    line = _Line()
    with _stop_on_signals() as stopped:
        try:
            stats = run_scenario(
                run,
                broker,
                options,
                progress=lambda p: line.show(_run_status(scenario.name, run.speed, p)),
                should_stop=lambda: stopped[0],
            )
        except ConnectError as exc:
            raise UsageError(str(exc)) from None
        finally:
            line.done()
        for text in _run_report(run, stats, interrupted=stopped[0]):
            print(text)
        if stopped[0]:
            return 130
        failed = stats.refused or stats.acked < stats.published - stats.resent
        if not args.check:
            return 1 if failed else 0
        print(
            f"waiting up to {args.check_timeout:g} s for the alerts the scenario expects "
            f"({len(run.expected)})..."
        )

        def polled(result: checking.CheckResult) -> None:
            met = sum(1 for _, a in result.outcomes if a is not None)
            line.show(
                f"check  {met}/{len(result.outcomes)} expected met, "
                f"{len(result.unexpected)} unexpected, {result.waited_s:.0f} s"
            )

        try:
            result = _db(
                checking.wait_for_alerts(run, dsn, baseline, args.check_timeout, on_poll=polled)
            )
        finally:
            line.done()
    for text in result.lines():
        print(text)
    return 0 if result.passed and not failed else 1


def _db(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except checking.CheckError as exc:
        raise UsageError(str(exc)) from None


def _run_status(name: str, speed: float | None, p: RunProgress) -> str:
    s = p.stats
    rate = s.published / p.elapsed_s if p.elapsed_s >= 1 else 0.0
    # Behind by more than a wall second: the broker or this process cannot keep the pace.
    late = bool(speed) and p.behind_s / (speed or 1.0) > 1.0
    behind = f"  behind by {p.behind_s / 60:,.0f} simulated min" if late else ""
    return (
        f"sim {name}  {p.sim_time:%Y-%m-%d %H:%M}Z {100 * p.fraction:3.0f}%  "
        f"sent {s.published:,}  acked {s.acked:,}  {rate:,.0f} msg/s{behind}"
    )


def _run_report(run: SimRun, stats: RunStats, *, interrupted: bool) -> list[str]:
    s = stats
    span = run.end - run.start
    speed = run.speed
    pace = f"{speed:g}x" if speed else "max speed"
    unacked = s.published - s.resent - s.acked - s.refused
    out = [
        f"sim run {run.scenario.name}: {len(run.pumps)} pumps, {_t(run.start)} -> {_t(run.end)} "
        f"({_span(span)}) at {pace}" + (" - INTERRUPTED" if interrupted else ""),
        f"observations  {s.observations:>10,}  (lost on purpose {s.lost}: seq spent, not sent; "
        f"held back {s.held_back}; invalid {s.invalid})",
        f"published     {s.published:>10,}  (duplicates {s.duplicated}, resent after "
        f"reconnect {s.resent}, reconnects {s.reconnects})",
        f"acknowledged  {s.acked:>10,}  (refused {s.refused}, unacknowledged {unacked})",
    ]
    return out


def _t(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")


def _span(value: timedelta) -> str:
    """2d, 1d12h, 90m: the scenario files' own notation."""
    seconds = int(value.total_seconds())
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts) or "0s"


# sim load ---------------------------------------------------------------------------------------


def sim_load(args: argparse.Namespace, settings: Settings) -> int:
    config = LoadConfig(
        pumps=args.pumps,
        rate=args.rate,
        duration_s=args.duration,
        processes=args.processes,
        connections=args.connections,
        qos=args.qos,
        inflight=args.inflight,
        interval_s=args.interval,
        seed=args.seed,
        id_prefix=args.id_prefix,
        seq_start=args.seq_start,
    )
    try:
        config.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    broker = _broker(settings, "sim-load")
    line = _Line()
    last: list[Progress] = []

    def show(p: Progress) -> None:
        previous = last[0] if last else None
        last[:] = [p]
        if previous is not None and p.elapsed_s > previous.elapsed_s:
            rate = (p.sent - previous.sent) / (p.elapsed_s - previous.elapsed_s)
        else:
            rate = p.sent / p.elapsed_s if p.elapsed_s else 0.0
        acked = f"acked {p.acked:,}  in flight {p.inflight:,}  " if config.qos else ""
        line.show(
            f"sim load  {p.elapsed_s:5.1f}/{config.duration_s:g} s  {rate:>8,.0f} msg/s  "
            f"sent {p.sent:,}  {acked}errors {p.errors + p.refused + p.lost}"
        )

    log.info(
        "sim load starting",
        extra={
            "pumps": config.pumps,
            "rate": config.rate,
            "duration_s": config.duration_s,
            "processes": config.processes,
            "broker": broker.url,
        },
    )
    try:
        report: LoadReport = run_load(config, broker, show)
    except ConnectError as exc:
        raise UsageError(str(exc)) from None
    finally:
        line.done()
    for text in report.lines():
        print(text)
    if report.interrupted:
        return 130
    return 1 if report.failed or report.errors else 0


# sim list ---------------------------------------------------------------------------------------


def sim_list(args: argparse.Namespace, settings: Settings) -> int:
    for name, path in builtin_scenarios().items():
        try:
            s = load_scenario(path)
        except ScenarioError as exc:
            print(f"{name:<14} (broken: {exc})")
            continue
        speed = f"{s.speed:g}x" if s.speed != "max" else "max speed"
        expects = sum(len(p.expect) for p in s.pumps) + sum(len(t.expect) for t in s.timeline)
        print(
            f"{name:<14} {s.fleet.n:>6} pumps  {_span(s.duration):>6} at {speed:>6}  "
            f"{expects} expected alerts{'  strict' if s.strict else ''}"
        )
        if s.description:
            print(f"{'':<15}{' '.join(s.description.split())}")
    return 0


# sim register, sim detect, sim year -----------------------------------------------------------


def sim_register(args: argparse.Namespace, settings: Settings) -> int:
    try:
        run = build_run(load_scenario(args.scenario))
    except ScenarioError as exc:
        raise UsageError(str(exc)) from None
    n = _db(checking.register_pumps(settings.database_url.get_secret_value(), run))
    print(f"{n} pumps of {args.scenario} registered with a clinic profile")
    return 0


def sim_detect(args: argparse.Namespace, settings: Settings) -> int:
    families = tuple(args.family or detecting.FAMILIES)
    line = _Line()
    outcomes = []
    cases = detecting.CASES
    for i, case in enumerate(cases):
        line.show(f"detect: case {i + 1}/{len(cases)}: {case.name}")
        outcomes += [detecting.run_case(case, fam, args.seed) for fam in families]
    line.done()
    print("\n".join(detecting.format_table(outcomes)))
    return 0


def sim_year(args: argparse.Namespace, settings: Settings) -> int:
    line = _Line()

    def progress(day: float, messages: int) -> None:
        line.show(f"year: day {day:.0f}/{args.days} of {args.pumps} pumps, {messages:,} messages")

    mix = FleetMix(reporting_interval_s=args.interval)
    if args.processes > 1:
        line.show(f"year: {args.pumps} pumps over {args.processes} processes, no progress")
        report = detecting.healthy_year_parallel(
            args.pumps, float(args.days), args.seed, mix, args.processes
        )
    else:
        report = detecting.healthy_year(
            args.pumps, float(args.days), args.seed, mix, progress=progress
        )
    line.done()
    print("\n".join(detecting.format_year(report)))
    return 1 if report.unexpected else 0
