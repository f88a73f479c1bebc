"""What the plugins bring: ``batchd plugins`` lists them, ``batchd schema`` prints their tasks' manifest schema."""

from __future__ import annotations

import json

import click

from batchd.cli.common import ConfigProblem, Context, pass_context


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def plugins(ctx: Context, as_json: bool) -> None:
    """List the loaded plugins: name, version, source, hooks and tasks."""
    import dataclasses

    from batchd.plugins import PluginError, plugins_for

    try:
        described = plugins_for(ctx.settings())
    except PluginError as error:
        raise ConfigProblem(str(error)) from None
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(plugin) for plugin in described], indent=2))
        return
    _print_plugins(described)


def _print_plugins(described) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False)
    for column in ("plugin", "version", "source", "hooks", "tasks"):
        table.add_column(column)
    for plugin in described:
        table.add_row(plugin.name, plugin.version or "-", plugin.source,
                      ", ".join(plugin.hooks) or "-", ", ".join(plugin.tasks) or "-")
    Console().print(table if described else "no plugins")


@click.command()
@pass_context
def schema(ctx: Context) -> None:
    """Print the JSON Schema of job manifests (every installed task's, and plugins_dir's)."""
    from batchd.manifest import manifest_json_schema

    click.echo(json.dumps(manifest_json_schema(ctx.tasks()), indent=2))
