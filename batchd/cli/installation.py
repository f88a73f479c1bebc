"""Setting up and looking after an installation: ``batchd init``, ``service install``, ``config show`` /
``config reference`` and ``doctor``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from batchd.cli.common import Context, pass_context
from batchd.config import load_settings


@click.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing config.toml with the template.")
def init(folder: Path, force: bool) -> None:
    """Create a working FOLDER: commented config.toml, batchd.env, inbox/, outbox/, plugins/, state/."""
    from batchd.service import init_workdir

    try:
        created = init_workdir(folder, force=force)
    except FileExistsError as error:
        raise click.ClickException(str(error)) from None
    for path in created:
        click.echo(f"created {path}{'/' if path.is_dir() else ''}")
    config = folder.expanduser().resolve() / "config.toml"
    click.echo(f"next: edit {config}, then `batchd --config {config} run` or `batchd --config {config} service install`")


@click.group("service")
def service_group() -> None:
    """Run batchd as a systemd service."""


@service_group.command("install")
@click.option("--user", "user_unit", is_flag=True, help="A user unit (systemctl --user) instead of a system one.")
@click.option("--print", "print_only", is_flag=True, help="Print the unit instead of writing it.")
@click.option("--target-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the unit here instead of /etc/systemd/system or ~/.config/systemd/user.")
@pass_context
def service_install(ctx: Context, user_unit: bool, print_only: bool, target_dir: Path | None) -> None:
    """Write batchd.service for this installation (its executable, working folder and config)."""
    from batchd import service as units

    settings = ctx.settings()
    try:
        paths = units.unit_paths(settings)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    text = units.render_unit(paths, user=user_unit)
    if print_only:
        click.echo(text, nl=False)
        return
    target = target_dir or (units.user_unit_dir() if user_unit else units.SYSTEM_UNIT_DIR)
    try:
        path = units.install_unit(text, target)
    except PermissionError:
        raise click.ClickException(f"cannot write to {target}: run with sudo, or use --user") from None
    manager = "systemctl --user" if user_unit else "sudo systemctl"
    click.echo(f"wrote {path}\nnext: {manager} daemon-reload && {manager} enable --now {units.UNIT_NAME}")


@click.group("config")
def config_group() -> None:
    """The effective configuration and its reference."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def config_show(ctx: Context, as_json: bool) -> None:
    """The effective settings and where each came from (secrets masked)."""
    from batchd.config import SECRET_ENV_VARS
    from batchd.logs import redact_data

    settings = ctx.settings()
    values = _flatten(settings.redacted_dict())
    sources = settings.sources()
    secrets = {name: "set" if os.environ.get(name) else "not set" for name in SECRET_ENV_VARS}
    if as_json:
        click.echo(json.dumps(redact_data({
            "config_file": str(settings.config_file) if settings.config_file else None,
            "settings": {key: {"value": value, "source": sources.get(key, "default")} for key, value in values.items()},
            "secrets": secrets}), indent=2))
        return
    from rich.table import Table

    from batchd.views import console

    table = Table(show_edge=False, title=f"config file: {settings.config_file or 'none'}")
    for column in ("setting", "value", "source"):
        table.add_column(column)
    for key, value in values.items():
        table.add_row(key, json.dumps(redact_data(value)), sources.get(key, "default"))
    for name, state in secrets.items():
        table.add_row(name, state, "environment")
    console().print(table)


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@config_group.command("reference")
def config_reference() -> None:
    """Print the configuration reference (docs/configuration.md) generated from the settings model."""
    from batchd.reference import configuration_reference

    click.echo(configuration_reference(), nl=False)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def doctor(ctx: Context, as_json: bool) -> None:
    """Check the config, folders, inotify limits, provider and API key; exit 1 if a check fails."""
    from batchd.doctor import run_checks

    def settings():
        return load_settings(ctx.config_path)

    checks = run_checks(settings)
    failed = any(check.status == "fail" for check in checks)
    if as_json:
        click.echo(json.dumps({"ok": not failed, "checks": [check.as_dict() for check in checks]}, indent=2))
    else:
        from rich.markup import escape

        from batchd.views import console as make_console

        console = make_console()
        marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
        for check in checks:
            console.print(f"{marks[check.status]:>16}  [bold]{escape(check.name)}[/]: {escape(check.detail)}")
            if check.fix and check.status != "ok":
                console.print(f"{'':>6}fix: {escape(check.fix)}")
    if failed:
        sys.exit(1)
