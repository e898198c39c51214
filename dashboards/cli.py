"""`pumpfleet dashboards build [--out DIR] [--check]`: write the Grafana dashboards and their
provisioning, or say whether a directory holds what build would write."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dashboards import DEFAULT_OUT, build, check
from pumpfleet import cli

app = typer.Typer(
    name="dashboards", help=__doc__, short_help="Grafana dashboards as code", no_args_is_help=True
)


@app.command(
    "build",
    help="write the dashboard JSON and Grafana provisioning (datasources, providers, folders)",
)
def _build(
    out: Annotated[
        Path,
        typer.Option(
            metavar="DIR",
            help="output directory (the copy docker-compose.yml mounts by default)",
        ),
    ] = DEFAULT_OUT,
    check_only: Annotated[
        bool,
        typer.Option(
            "--check",
            help="write nothing; exit 1 and list the files that differ from what build would write",
        ),
    ] = False,
) -> None:
    if out.exists() and not out.is_dir():
        raise cli.UsageError(f"--out {out} is a file; give a directory")
    if check_only:
        problems = check(out)
        for line in problems:
            print(line)
        print(f"{out}: {'up to date' if not problems else f'{len(problems)} files out of date'}")
        if problems:
            raise typer.Exit(1)
        return
    try:
        written = build(out)
    except PermissionError as exc:
        raise cli.UsageError(
            f"cannot write {exc.filename}: permission denied; choose --out"
        ) from None
    for path in written:
        print(f"wrote {path}")
