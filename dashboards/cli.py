"""`pumpfleet dashboards build [--out DIR] [--check]`: write the Grafana dashboards and their
provisioning, or say whether a directory holds what build would write."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dashboards import DEFAULT_OUT, build, check
from pumpfleet.cli import UsageError
from pumpfleet.settings import Settings


def register(sub: Any) -> None:
    group = sub.add_parser(
        "dashboards", help="Grafana dashboards as code", description=__doc__
    ).add_subparsers(required=True, metavar="ACTION")
    text = "write the dashboard JSON and Grafana provisioning (datasources, providers, folders)"
    p: argparse.ArgumentParser = group.add_parser("build", help=text, description=text)
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"output directory (default {DEFAULT_OUT}, the copy docker-compose.yml mounts)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 and list the files that differ from what build would write",
    )
    p.set_defaults(handler=_build)


def _build(args: argparse.Namespace, settings: Settings) -> int:
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if args.check:
        problems = check(out)
        for line in problems:
            print(line)
        print(f"{out}: {'up to date' if not problems else f'{len(problems)} files out of date'}")
        return 1 if problems else 0
    try:
        written = build(out)
    except PermissionError as exc:
        raise UsageError(f"cannot write {exc.filename}: permission denied; choose --out") from None
    for path in written:
        print(f"wrote {path}")
    return 0
