"""``batchd cache``: the request cache's contents and their removal."""

from __future__ import annotations

import contextlib
import json
import sqlite3

import click

from batchd.cli.common import Context, pass_context
from batchd.config import Settings


@click.group("cache")
def cache_group() -> None:
    """The request cache: answers reused by jobs with cache = true (state_dir/cache.sqlite3)."""


@contextlib.contextmanager
def _cache_store(settings: Settings):
    """The state dir's request cache; a damaged one is said in one line with what to do, not a traceback."""
    from batchd.cache import CacheStore, cache_path, damage_message
    from batchd.fs import is_damaged_database

    path = cache_path(settings.state_dir)
    try:
        with CacheStore(path) as store:
            yield store
    except sqlite3.DatabaseError as error:
        if not is_damaged_database(error):
            raise
        raise click.ClickException(damage_message(path, error)) from None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@cache_group.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def cache_stats(ctx: Context, as_json: bool) -> None:
    """What the request cache holds: answers, their size, the oldest and newest, per model; and its bounds."""
    settings = ctx.settings()
    with _cache_store(settings) as store:
        stats = store.stats()
    stats["max_entries"] = settings.cache_max_entries
    stats["max_bytes"] = int(settings.cache_max_mb * 1024 * 1024)
    stats["enabled"] = settings.cache
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    click.echo(f"request cache {stats['path']} ({'on' if settings.cache else 'off'} by default; "
               f"a manifest's cache overrides)")
    click.echo(f"  answers   {stats['entries']:,} of at most {stats['max_entries']:,}")
    click.echo(f"  size      {stats['bytes']:,} bytes of at most {stats['max_bytes']:,} "
               f"({stats['file_bytes']:,} on disk)")
    click.echo(f"  oldest    {_age(stats['oldest'])}")
    click.echo(f"  newest    {_age(stats['newest'])}")
    for model, count in stats["by_model"].items():
        click.echo(f"  {model:<24}{count:,}")


@cache_group.command("prune")
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), metavar="DAYS",
              help="Remove the answers stored more than DAYS days ago.")
@click.option("--all", "everything", is_flag=True, help="Remove every answer.")
@pass_context
def cache_prune(ctx: Context, older_than: float | None, everything: bool) -> None:
    """Remove answers from the request cache: --all, those --older-than DAYS, or (neither) the oldest beyond
    cache_max_entries / cache_max_mb. Safe while the daemon runs: jobs being built keep what they took."""
    if everything and older_than is not None:
        raise click.UsageError("give --all or --older-than, not both")
    settings = ctx.settings()
    with _cache_store(settings) as store:
        if everything or older_than is not None:
            removed = store.prune(older_than_days=older_than, everything=everything)
        else:
            removed = store.evict(settings.cache_max_entries, int(settings.cache_max_mb * 1024 * 1024))
        left = store.stats()["entries"]
        if removed:
            store.vacuum()
    click.echo(f"removed {removed:,} answer(s); {left:,} left")
