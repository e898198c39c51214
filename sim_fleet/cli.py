"""`pumpfleet sim run|load|list`: scenarios through the real broker, and the benchmark load."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import FrameType
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from pumpfleet import cli
from pumpfleet.broker import BrokerConfigError, BrokerOptions
from pumpfleet.settings import Settings
from sim_fleet import _check as checking
from sim_fleet import _detect as detecting
from sim_fleet._fleet import FleetMix
from sim_fleet._load import LoadConfig, LoadReport, run_load
from sim_fleet._load import Progress as LoadProgress
from sim_fleet._mqtt import ConnectError
from sim_fleet._run import RunOptions, RunProgress, RunStats, run_scenario
from sim_fleet._scenario import (
    ScenarioError,
    SimRun,
    build_run,
    builtin_scenarios,
    load_scenario,
    with_fleet_size,
)

log = logging.getLogger("sim_fleet")

app = typer.Typer(
    name="sim",
    help="fleet simulator: run scenarios, generate benchmark load",
    no_args_is_help=True,
)

Scenario = Annotated[
    str,
    typer.Argument(
        metavar="SCENARIO", help="a shipped scenario's name (see `sim list`) or a YAML file"
    ),
]
Family = StrEnum("Family", [(f, f) for f in detecting.FAMILIES])  # type: ignore[misc]
"""`--family`: the pump families of sim_fleet._detect (typer takes a list of an Enum)."""


def _speed(text: str) -> float | str:
    if text == "max":
        return "max"
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number or max") from None
    if value <= 0:
        raise typer.BadParameter("must be positive")
    return value


def _broker(settings: Settings, name: str) -> BrokerOptions:
    try:
        broker = BrokerOptions.from_settings(settings.mqtt, name)
        if broker.tls:
            broker.tls_context()  # unusable TLS files: a configuration error, not a retry
    except BrokerConfigError as exc:
        raise cli.UsageError(str(exc)) from None
    return broker


@contextmanager
def _progress(total: float | None) -> Iterator[Callable[[float, str], None]]:
    """Yields `show(done, status)`: a bar and the status on stderr, redrawn in place on a
    terminal; elsewhere (docker logs, CI) the status as a log line every 10 s."""
    out = cli.console(stderr=True)
    if not out.is_terminal:
        due = [time.monotonic() + 10]

        def log_status(done: float, status: str) -> None:
            if time.monotonic() >= due[0]:
                due[0] = time.monotonic() + 10
                log.info("progress", extra={"status": status})

        yield log_status
        return
    with Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=out,
    ) as bar:
        task = bar.add_task("", total=total)
        yield lambda done, status: bar.update(task, completed=done, description=status)


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


@app.command("run", help="run a scenario's fleet through the MQTT broker, paced in simulated time")
def sim_run(
    ctx: typer.Context,
    scenario_name: Scenario,
    speed: Annotated[
        Any,  # float or "max": typer takes no unions, `_speed` makes one
        typer.Option(
            parser=_speed,
            metavar="N|max",
            help="simulated seconds per wall second, or max (default: the scenario's)",
        ),
    ] = None,
    pumps: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="fleet size: the scenario's pumps, then healthy ones of its mix up to N "
            "(default: the scenario's)",
        ),
    ] = None,
    pumps_per_connection: Annotated[
        int, typer.Option(metavar="N", help="pumps sharing one MQTT connection")
    ] = RunOptions.pumps_per_connection,
    inflight: Annotated[
        int, typer.Option(metavar="N", help="unacknowledged publishes per connection")
    ] = RunOptions.inflight,
    seq_start: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="first seq of every pump (default: the start time in microseconds, so seqs "
            "keep rising across runs)",
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="afterwards, read the alerts table and check the scenario's expected alerts",
        ),
    ] = False,
    check_timeout: Annotated[
        float, typer.Option(metavar="S", help="how long to wait for the expected alerts")
    ] = 120.0,
) -> None:
    try:
        scenario = load_scenario(scenario_name)
        if speed is not None:
            scenario = scenario.model_copy(update={"speed": speed})
        if pumps is not None:
            scenario = with_fleet_size(scenario, pumps)
        run = build_run(scenario)
    except ScenarioError as exc:
        raise cli.UsageError(str(exc)) from None
    if pumps_per_connection < 1 or not 1 <= inflight <= 65_535:
        raise cli.UsageError("--pumps-per-connection must be >= 1 and --inflight in 1..65535")
    settings = cli.settings(ctx, broker_account="fleet")
    broker = _broker(settings, "sim")
    dsn = settings.database_url.get_secret_value()
    baseline = 0
    if check:  # before the run: a database problem should not wait for a long run
        baseline = _db(checking.alert_baseline(dsn))
    options = RunOptions(
        pumps_per_connection=pumps_per_connection, inflight=inflight, seq_start=seq_start
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
    with _stop_on_signals() as stopped:
        try:
            with _progress(1.0) as show:
                stats = run_scenario(
                    run,
                    broker,
                    options,
                    progress=lambda p: show(p.fraction, _run_status(scenario.name, run.speed, p)),
                    should_stop=lambda: stopped[0],
                )
        except ConnectError as exc:
            raise cli.UsageError(str(exc)) from None
        for text in _run_report(run, stats, interrupted=stopped[0]):
            print(text)
        if stopped[0]:
            raise typer.Exit(130)
        failed = stats.refused or stats.acked < stats.published - stats.resent
        if not check:
            if failed:
                raise typer.Exit(1)
            return
        print(
            f"waiting up to {check_timeout:g} s for the alerts the scenario expects "
            f"({len(run.expected)})..."
        )
        with _progress(len(run.expected)) as show:

            def polled(result: checking.CheckResult) -> None:
                met = sum(1 for _, a in result.outcomes if a is not None)
                show(
                    met,
                    f"check  {met}/{len(result.outcomes)} expected met, "
                    f"{len(result.unexpected)} unexpected, {result.waited_s:.0f} s",
                )

            result = _db(
                checking.wait_for_alerts(run, dsn, baseline, check_timeout, on_poll=polled)
            )
    for text in result.lines():
        print(text)
    if not result.passed or failed:
        raise typer.Exit(1)


def _db(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except checking.CheckError as exc:
        raise cli.UsageError(str(exc)) from None


def _run_status(name: str, speed: float | None, p: RunProgress) -> str:
    s = p.stats
    rate = s.published / p.elapsed_s if p.elapsed_s >= 1 else 0.0
    # Behind by more than a wall second: the broker or this process cannot keep the pace.
    late = bool(speed) and p.behind_s / (speed or 1.0) > 1.0
    behind = f"  behind by {p.behind_s / 60:,.0f} simulated min" if late else ""
    return (
        f"sim {name}  {p.sim_time:%Y-%m-%d %H:%M}Z  "
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


@app.command(
    "load", help="benchmark load: contract-valid telemetry from many pumps at a fixed rate"
)
def sim_load(
    ctx: typer.Context,
    pumps: Annotated[int, typer.Option(help="simulated pumps")] = LoadConfig.pumps,
    rate: Annotated[float, typer.Option(help="messages per second")] = LoadConfig.rate,
    duration: Annotated[float, typer.Option(help="seconds")] = LoadConfig.duration_s,
    processes: Annotated[int, typer.Option(help="worker processes")] = LoadConfig.processes,
    connections: Annotated[
        int, typer.Option(help="MQTT connections per process")
    ] = LoadConfig.connections,
    qos: Annotated[int, typer.Option(min=0, max=1, help="MQTT QoS")] = LoadConfig.qos,
    inflight: Annotated[
        int, typer.Option(help="unacknowledged publishes per connection, at most 65535")
    ] = LoadConfig.inflight,
    interval: Annotated[
        int,
        typer.Option(help="simulated reporting interval in s: device time step per message"),
    ] = LoadConfig.interval_s,
    seed: Annotated[int, typer.Option(help="fleet seed")] = LoadConfig.seed,
    id_prefix: Annotated[
        str, typer.Option(help="pump ids are PREFIX-000001...")
    ] = LoadConfig.id_prefix,
    seq_start: Annotated[
        int | None,
        typer.Option(help="first seq of every pump (default: the start time in microseconds)"),
    ] = None,
) -> None:
    config = LoadConfig(
        pumps=pumps,
        rate=rate,
        duration_s=duration,
        processes=processes,
        connections=connections,
        qos=qos,
        inflight=inflight,
        interval_s=interval,
        seed=seed,
        id_prefix=id_prefix,
        seq_start=seq_start,
    )
    try:
        config.check()
    except ValueError as exc:
        raise cli.UsageError(str(exc)) from None
    broker = _broker(cli.settings(ctx, broker_account="fleet"), "sim-load")
    last: list[LoadProgress] = []
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
    with _progress(config.duration_s) as show:

        def status(p: LoadProgress) -> None:
            previous = last[0] if last else None
            last[:] = [p]
            if previous is not None and p.elapsed_s > previous.elapsed_s:
                now = (p.sent - previous.sent) / (p.elapsed_s - previous.elapsed_s)
            else:
                now = p.sent / p.elapsed_s if p.elapsed_s else 0.0
            acked = f"acked {p.acked:,}  in flight {p.inflight:,}  " if config.qos else ""
            show(
                p.elapsed_s,
                f"sim load  {now:>8,.0f} msg/s  sent {p.sent:,}  {acked}"
                f"errors {p.errors + p.refused + p.lost}",
            )

        try:
            report: LoadReport = run_load(config, broker, status)
        except ConnectError as exc:
            raise cli.UsageError(str(exc)) from None
    for text in report.lines():
        print(text)
    if report.interrupted:
        raise typer.Exit(130)
    if report.failed or report.errors:
        raise typer.Exit(1)


# sim list ---------------------------------------------------------------------------------------


@app.command("list", help="list the shipped scenarios")
def sim_list() -> None:
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


# sim register, sim detect, sim year -----------------------------------------------------------


@app.command(
    "register",
    help="write a scenario's pumps into the registry as their clinic would (profiles)",
)
def sim_register(ctx: typer.Context, scenario_name: Scenario) -> None:
    try:
        run = build_run(load_scenario(scenario_name))
    except ScenarioError as exc:
        raise cli.UsageError(str(exc)) from None
    n = _db(checking.register_pumps(cli.settings(ctx).database_url.get_secret_value(), run))
    print(f"{n} pumps of {scenario_name} registered with a clinic profile")


@app.command(
    "detect",
    help="print the detection table: each fault on each pump family, straight into the rule "
    "engine: detected or not, by which rule, priority, and time from onset to alert",
)
def sim_detect(
    family: Annotated[
        list[Family] | None,
        typer.Option(help="only this pump family (repeatable; default: all)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="the pumps' random seed")] = 1,
) -> None:
    chosen = {f.value for f in family or Family}
    families = tuple(fam for fam in detecting.FAMILIES if fam in chosen)
    outcomes = []
    cases = detecting.CASES
    with _progress(len(cases)) as show:
        for i, case in enumerate(cases):
            show(i, f"detect: case {i + 1}/{len(cases)}: {case.name}")
            outcomes += [detecting.run_case(case, fam, seed) for fam in families]
        show(len(cases), f"detect: {len(cases)} cases")
    print("\n".join(detecting.format_table(outcomes)))


@app.command(
    "year",
    help="run a healthy mixed fleet for a simulated year through the rule engine and count the "
    "alerts by rule; exit status 1 if any alert is one a healthy fleet should not raise",
)
def sim_year(
    pumps: Annotated[int, typer.Option(min=1, help="fleet size")] = 1000,
    days: Annotated[int, typer.Option(min=1, help="simulated days")] = 365,
    seed: Annotated[int, typer.Option(help="the fleet's random seed")] = 1,
    interval: Annotated[
        int, typer.Option(min=1, help="every pump's reporting interval in seconds")
    ] = 600,
    processes: Annotated[int, typer.Option(min=1, help="split the fleet over N processes")] = 1,
) -> None:
    mix = FleetMix(reporting_interval_s=interval)
    if processes > 1:
        with _progress(None) as show:
            show(0, f"year: {pumps} pumps over {processes} processes, no progress")
            report = detecting.healthy_year_parallel(pumps, float(days), seed, mix, processes)
    else:
        with _progress(days) as show:
            report = detecting.healthy_year(
                pumps,
                float(days),
                seed,
                mix,
                progress=lambda day, messages: show(
                    day, f"year: day {day:.0f}/{days} of {pumps} pumps, {messages:,} messages"
                ),
            )
    print("\n".join(detecting.format_year(report)))
    if report.unexpected:
        raise typer.Exit(1)
