"""What every ``batchd`` command shares: the lazily loaded settings (:class:`Context`), the config error
and its exit status, what batchd says when it found no config file, and the journal opened read-only."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click

from batchd.config import ConfigError, Settings, load_settings
from batchd.logs import setup_logging

if TYPE_CHECKING:
    from batchd.journal import Journal


#: Exit status of a configuration or plugin error (sysexits.h EX_CONFIG). The systemd unit
#: names it in RestartPreventExitStatus: restarting cannot fix a bad config, so it must not loop.
EXIT_CONFIG = 78


class ConfigProblem(click.ClickException):
    """A config or plugin error, reported like any click error but exiting :data:`EXIT_CONFIG`."""

    exit_code = EXIT_CONFIG


class Context:
    """Settings are loaded lazily: ``batchd schema`` and ``batchd emulator`` need none."""

    def __init__(self, config_path: Path | None, log_level: str | None = None, log_format: str | None = None):
        self.config_path = config_path
        self.log_level = log_level
        self.log_format = log_format
        self._warned = False

    def settings(self, *, warn_without_config: bool = True, **overrides) -> Settings:
        """The settings; without a config file, a warning says where batchd looked and that it uses the
        defaults (commands that fail without one say it in their error instead)."""
        try:
            settings = load_settings(self.config_path, **overrides)
        except ConfigError as error:
            raise ConfigProblem(str(error)) from None
        # The flags win; otherwise the config's log_level / log_format apply from here on.
        setup_logging(self.log_level or settings.log_level, self.log_format or settings.log_format)
        if settings.config_file is None and warn_without_config and not self._warned:
            self._warned = True
            logging.getLogger("batchd").warning("%s", no_config_file(settings))
        return settings

    def tasks(self) -> dict:
        """The tasks of the plugins the settings select; a broken plugin is a clean error."""
        from batchd.plugins import PluginError, tasks_for

        try:
            return tasks_for(self.settings())
        except PluginError as error:
            raise ConfigProblem(str(error)) from None


pass_context = click.make_pass_decorator(Context)


def config_looked_for() -> str:
    """Where batchd looked for a config file, when it found none."""
    from batchd.config import CONFIG_ENV_VAR, DEFAULT_CONFIG_NAME

    return f"none given (--config PATH or {CONFIG_ENV_VAR}) and no {Path.cwd() / DEFAULT_CONFIG_NAME}"


def config_origin(settings: Settings) -> str:
    """Where ``settings`` came from, for an error that may stem from the wrong (or no) config file."""
    return (f"config file {settings.config_file}" if settings.config_file is not None
            else f"no config file: {config_looked_for()}")


def no_config_file(settings: Settings) -> str:
    """What batchd says when it found no config file: where it looked, and the defaults it uses instead."""
    return (f"no config file: {config_looked_for()}; using the built-in defaults: inbox {settings.inbox}, outbox "
            f"{settings.outbox}, state_dir {settings.state_dir}, provider {settings.provider} "
            f"(`batchd init DIR` makes a working folder with a config.toml)")


@contextlib.contextmanager
def reading_journal(settings: Settings) -> Iterator[Journal | None]:
    """The state dir's journal, read-only, closed after the block; None while batchd has made none.

    A damaged page met while reading (the open reads only the schema) is said in one line, as the
    daemon says it, not as a traceback."""
    from batchd.journal import Journal, JournalUnreadable, journal_path

    path = journal_path(settings.state_dir)
    if not path.exists():
        yield None
        return
    try:
        journal = Journal(path, readonly=True)
    except JournalUnreadable as error:
        raise click.ClickException(str(error)) from None
    try:
        yield journal if journal.initialized else None  # None: created, its tables not committed yet
    except sqlite3.DatabaseError as error:
        damage = journal.damage(error)
        if damage is None:
            raise
        raise click.ClickException(str(damage)) from None
    finally:
        journal.close()
