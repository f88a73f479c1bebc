"""The ``batchd`` command line."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from batchd import __version__
from batchd.config import ConfigError, Settings, load_settings


class Context:
    """Settings are loaded lazily: ``batchd schema`` and ``batchd emulator`` need none."""

    def __init__(self, config_path: Path | None):
        self.config_path = config_path

    def settings(self, **overrides) -> Settings:
        try:
            return load_settings(self.config_path, **overrides)
        except ConfigError as error:
            raise click.ClickException(str(error)) from None

    def tasks(self) -> dict:
        """The tasks of the plugins the settings select; a broken plugin is a clean error."""
        from batchd.plugins import PluginError, tasks_for

        try:
            return tasks_for(self.settings())
        except PluginError as error:
            raise click.ClickException(str(error)) from None


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchd")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="BATCHD_CONFIG", help="Config file (default: ./config.toml if present).")
@click.option("--log-level", default="INFO", show_default=True, envvar="BATCHD_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, log_level: str) -> None:
    """batchd: drop job manifests into inbox/, find organized Gemini batch results in outbox/."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The HTTP clients log every request at INFO: batchd's own lines say what matters.
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    ctx.obj = Context(config_path)


@main.command()
@click.option("--once", is_flag=True, help="Take what is in the inbox, wait until it is delivered, exit.")
@click.option("--inbox", type=click.Path(file_okay=False, path_type=Path))
@click.option("--outbox", type=click.Path(file_okay=False, path_type=Path))
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--provider", type=click.Choice(["emulator", "gemini"]))
@click.option("--model")
@pass_context
def run(ctx: Context, once: bool, **overrides) -> None:
    """Run the daemon in the foreground (SIGTERM/SIGINT stop it cleanly)."""
    from batchd.daemon import AlreadyRunning, Daemon
    from batchd.plugins import PluginError

    settings = ctx.settings(**overrides)
    try:
        code = Daemon(settings, once=once).run()
    except (ConfigError, PluginError, AlreadyRunning) as error:
        raise click.ClickException(str(error)) from None
    sys.exit(code)


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_context
def submit(ctx: Context, manifest: Path) -> None:
    """Drop MANIFEST into the inbox atomically (validated first)."""
    from batchd.inbox import drop_file
    from batchd.manifest import ManifestError, load_manifest

    settings = ctx.settings()
    try:
        load_manifest(manifest, root=manifest.parent, tasks=ctx.tasks())
    except ManifestError as error:
        raise click.ClickException(str(error)) from None
    destination = drop_file(manifest, settings.inbox)
    click.echo(f"submitted {destination}")


@main.command()
@click.argument("name")
@pass_context
def cancel(ctx: Context, name: str) -> None:
    """Cancel job NAME (the manifest's name without extension, or a job id)."""
    from batchd.inbox import drop_bytes

    settings = ctx.settings()
    try:
        drop_bytes(b"", settings.inbox / f"{name}.cancel")
    except FileExistsError:
        click.echo(f"cancel of {name} was already requested")
        return
    click.echo(f"cancel requested for {name}")


def _open_journal(settings: Settings):
    from batchd.journal import Journal, journal_path

    path = journal_path(settings.state_dir)
    if not path.exists():
        return None
    return Journal(path, readonly=True)


def _job_view(journal, job) -> dict:
    chunks = journal.chunks(job.id)
    total = sum(c.request_count for c in chunks)
    done = 0
    for c in chunks:
        if c.state in ("fetched", "skipped"):
            done += c.request_count
        else:
            done += int(c.stats.get("successfulRequestCount", 0)) + int(c.stats.get("failedRequestCount", 0))
    return {
        "id": job.id,
        "name": job.name,
        "manifest": job.source,
        "task": job.task,
        "model": job.model,
        "state": job.state,
        "outcome": job.outcome,
        "requests": total,
        "done": done,
        "cancel_requested": job.cancel_requested,
        "outbox": job.outbox_dir,
        "error": job.error,
        "created_at": job.created_at,
        "remote_batches": [
            {"chunk": c.idx, "name": c.remote_name, "state": c.remote_state or c.state,
             "requests": c.request_count, "mode": c.mode}
            for c in chunks
        ],
    }


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def status(ctx: Context, name: str | None, as_json: bool) -> None:
    """Show jobs (all unfinished and recent ones, or the jobs named NAME)."""
    settings = ctx.settings()
    journal = _open_journal(settings)
    jobs = []
    if journal is not None:
        selected = journal.find_jobs(name) if name else journal.jobs()
        jobs = [_job_view(journal, job) for job in selected]
        journal.close()
    if name and not jobs:
        raise click.ClickException(f"no job named {name!r}")
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
        return
    _print_jobs(jobs)


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_jobs(ctx: click.Context, as_json: bool) -> None:
    """List every job the journal knows, oldest first."""
    ctx.invoke(status, name=None, as_json=as_json)


def _print_jobs(jobs: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False)
    for column in ("job", "manifest", "task", "state", "progress", "age"):
        table.add_column(column)
    for job in jobs:
        state = job["outcome"] if job["state"] == "done" else job["state"]
        if job["cancel_requested"] and job["state"] != "done":
            state += " (cancelling)"
        progress = f"{job['done']}/{job['requests']}" if job["requests"] else "-"
        table.add_row(job["id"], job["manifest"], job["task"] or "-", state, progress,
                      _age(time.time() - job["created_at"]))
    Console().print(table if jobs else "no jobs")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def plugins(ctx: Context, as_json: bool) -> None:
    """List the loaded plugins: name, version, source, hooks and tasks."""
    import dataclasses

    from batchd.plugins import PluginError, plugins_for

    try:
        described = plugins_for(ctx.settings())
    except PluginError as error:
        raise click.ClickException(str(error)) from None
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


@main.command()
@pass_context
def schema(ctx: Context) -> None:
    """Print the JSON Schema of job manifests (every installed task's, and plugins_dir's)."""
    from batchd.manifest import manifest_json_schema

    click.echo(json.dumps(manifest_json_schema(ctx.tasks()), indent=2))


def _add_emulator_command() -> None:
    from batchd.emulator.cli import emulator_command

    main.add_command(emulator_command, "emulator")


_add_emulator_command()
