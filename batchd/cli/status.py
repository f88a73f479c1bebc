"""What the journal says of the jobs: ``batchd status`` (with progress, or ``--watch``) and ``batchd list``."""

from __future__ import annotations

import json
import time

import click

from batchd.cli.common import Context, config_origin, pass_context, reading_journal
from batchd.config import Settings


#: ``batchd status`` without NAME shows unfinished jobs and those finished this recently.
STATUS_RECENT_SECONDS = 24 * 3600


def _read_jobs(settings: Settings, name: str | None, *, finished_within: float | None = None) -> list[dict]:
    """The jobs named ``name``, else every job; ``finished_within`` (seconds) leaves out jobs finished earlier."""
    from batchd.views import job_view

    with reading_journal(settings) as journal:
        if journal is None:
            if not settings.state_dir.is_dir():
                # Not "no jobs": this is no batchd's folder (run from elsewhere, or a config not found).
                raise click.ClickException(f"no batchd state at {settings.state_dir} ({config_origin(settings)}): "
                                           f"batchd has not run with these settings; give the config with "
                                           f"--config PATH or BATCHD_CONFIG")
            return []
        selected = journal.find_jobs(name) if name else journal.jobs()
        if finished_within is not None and not name:
            since = time.time() - finished_within
            selected = [job for job in selected if job.finished_at is None or job.finished_at >= since]
        return [job_view(journal, job) for job in selected]


@click.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--count", type=click.IntRange(min=1), help="With --watch: stop after this many refreshes.")
@pass_context
def status(ctx: Context, name: str | None, as_json: bool, watch: bool, interval: float, count: int | None) -> None:
    """Show jobs with their progress: the unfinished ones and those finished in the last 24 hours,
    or the jobs named NAME (`batchd list` shows every job)."""
    settings = ctx.settings(warn_without_config=False)
    jobs = _read_jobs(settings, name, finished_within=STATUS_RECENT_SECONDS)
    if name and not jobs:
        raise click.ClickException(f"no job named {name!r}")
    if watch:
        _watch(settings, name, as_json, interval, count)
    else:
        _print_jobs(jobs, as_json)
        _print_notices(settings)


def _print_notices(settings: Settings) -> None:
    """What the running daemon is waiting on (a refused key, a full disk), on stderr: the table or JSON on
    stdout stays the same for scripts."""
    from batchd.statedir import read_notices

    pid, notices = read_notices(settings.state_dir)
    for notice in notices:
        click.echo(f"batchd (pid {pid}): {notice}", err=True)


def _print_jobs(jobs: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
    else:
        from batchd.views import console, jobs_table

        console().print(jobs_table(jobs))


def _watch(settings: Settings, name: str | None, as_json: bool, interval: float, count: int | None) -> None:
    """Redraw in place on a terminal; elsewhere (a pipe, a log) print one frame (or JSON line) per refresh."""
    from rich.live import Live

    from batchd.views import console as make_console, status_frame

    console = make_console()
    refreshes = 0
    live = Live(console=console, auto_refresh=False) if console.is_terminal and not as_json else None
    try:
        if live is not None:
            live.start()
        while count is None or refreshes < count:
            if refreshes:
                time.sleep(interval)
            jobs = _read_jobs(settings, name, finished_within=STATUS_RECENT_SECONDS)
            refreshes += 1
            if as_json:
                click.echo(json.dumps({"time": time.time(), "jobs": jobs}))
            elif live is not None:
                live.update(status_frame(jobs), refresh=True)
            else:
                console.print(status_frame(jobs))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how --watch ends
    finally:
        if live is not None:
            live.stop()


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def list_jobs(ctx: Context, as_json: bool) -> None:
    """List every job the journal knows, oldest first."""
    _print_jobs(_read_jobs(ctx.settings(warn_without_config=False), None), as_json)
