"""The ``batchd`` command line: the ``main`` group and its global options. Each command lives in the
module named for what it does: ``daemon`` (run), ``jobs`` (submit, cancel, approve, retry), ``pricing``
(estimate), ``status`` (status, list), ``plugins`` (plugins, schema), ``webhooks``, ``cache``, and
``installation`` (init, service, config, doctor); what they share is in ``common``."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from batchd import __version__
from batchd.cli import cache, daemon, installation, jobs, plugins, pricing, status, webhooks
from batchd.cli.common import Context
from batchd.logs import FORMATS, LEVELS, setup_logging


class _Commands(click.Group):
    """batchd's commands, with ``batchd emulator`` imported only when it is used: it brings uvicorn and
    Starlette, which no other command needs (the daemon starts its embedded emulator as a child process)."""

    _LAZY = {"emulator": ("batchd.emulator.cli", "emulator_command")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._LAZY})  # a lazy command once loaded is listed by both

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, globals_first(args))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self._LAZY and name not in self.commands:
            module, attribute = self._LAZY[name]
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)


#: batchd's global options (each takes a value): accepted before the command and after it.
GLOBAL_OPTIONS = ("--config", "--log-level", "--log-format")


def globals_first(args: list[str]) -> list[str]:
    """``args`` with the global options given after the command (``batchd run --config F``, at any
    depth: ``batchd config show --config F``) moved before it, where click parses them. A global
    option given twice takes its last value, as click does; nothing after ``--`` is moved."""
    args = list(args)
    start = 0
    while start < len(args):  # the command is the first word that is neither an option nor its value
        word = args[start]
        if word == "--":
            return args
        if word in GLOBAL_OPTIONS:
            start += 2
        elif word.startswith("-"):
            start += 1
        else:
            break
    moved: list[str] = []
    kept: list[str] = []
    rest = args[start + 1:]
    index = 0
    while index < len(rest):
        word = rest[index]
        if word == "--":
            kept += rest[index:]
            break
        if word.partition("=")[0] in GLOBAL_OPTIONS and (word.partition("=")[1] or index + 1 < len(rest)):
            taken = 1 if "=" in word else 2
            moved += rest[index:index + taken]
            index += taken
            continue
        kept.append(word)
        index += 1
    return args[:start] + moved + args[start:start + 1] + kept


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchd")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="BATCHD_CONFIG", help="Config file (default: ./config.toml if present).")
@click.option("--log-level", envvar="BATCHD_LOG_LEVEL", type=click.Choice(LEVELS, case_sensitive=False),
              help="Least severe log level on stderr (default: the config's log_level, INFO).")
@click.option("--log-format", envvar="BATCHD_LOG_FORMAT", type=click.Choice(FORMATS),
              help="text (key=value fields) or json (default: the config's log_format, text).")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, log_level: str | None, log_format: str | None) -> None:
    """batchd: drop job manifests into inbox/, find organized Gemini batch results in outbox/."""
    log_level = log_level.upper() if log_level else None
    setup_logging(log_level or "INFO", log_format or "text")
    ctx.obj = Context(config_path, log_level, log_format)


for command in (daemon.run, jobs.submit, jobs.cancel, jobs.approve, jobs.retry_command, pricing.estimate,
                status.status, status.list_jobs, plugins.plugins, plugins.schema, webhooks.webhooks_group,
                cache.cache_group, installation.init, installation.service_group, installation.config_group,
                installation.doctor):
    main.add_command(command)
