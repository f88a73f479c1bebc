"""``batchd run``: the daemon in the foreground."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from batchd.cli.common import ConfigProblem, Context, pass_context
from batchd.config import ConfigError


@click.command()
@click.option("--once", is_flag=True,
              help="Take what is in the inbox, wait until it is delivered, exit: 1 if a job failed or was"
                   " rejected, 3 if jobs are left held over budget, 5 if a task plugin failed to organize"
                   " results (plugin_failed), 4 if jobs are partial.")
@click.option("--inbox", type=click.Path(file_okay=False, path_type=Path))
@click.option("--outbox", type=click.Path(file_okay=False, path_type=Path))
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--provider", type=click.Choice(["emulator", "gemini"]))
@click.option("--model")
@click.option("--http", metavar="HOST:PORT",
              help="Serve the dashboard, /metrics, /healthz, /readyz and /webhooks/gemini here (a bare PORT binds"
                   " 127.0.0.1); overrides `http` in the config.")
@pass_context
def run(ctx: Context, once: bool, **overrides) -> None:
    """Run the daemon in the foreground (SIGTERM/SIGINT stop it cleanly)."""
    # A stop may come while the daemon is still importing and loading plugins (a second or so):
    # it is remembered and honoured, instead of the signal killing the process, so that a stop at
    # any moment once batchd runs exits 0. The daemon installs its own handlers in run().
    early: dict = {"daemon": None, "stop": False}

    def stop_while_starting(_signum, _frame):
        early["stop"] = True
        if early["daemon"] is not None:
            early["daemon"].stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_while_starting)
    # A reload asked for while starting (SIGHUP would end the process): the start reads the config anyway.
    signal.signal(signal.SIGHUP, lambda _signum, _frame: None)

    from batchd.emulator.process import EmulatorFailed, EmulatorProcess

    settings = ctx.settings(**overrides)
    # The embedded emulator first: it boots in its own process while this one imports the daemon and the SDK
    # (a third of a second), and serves by the time the daemon has started. Its state has a lock of its own:
    # a second daemon's emulator waits for it, and is stopped once that daemon finds the state dir taken.
    # (Where it cannot write, the daemon's start says why, and starts none.)
    emulator = EmulatorProcess.embedded(settings) if settings.provider == "emulator" else None
    if emulator is not None and emulator.can_start():
        emulator.spawn()

    from batchd.daemon import AlreadyRunning, Daemon, fatal_storage_message
    from batchd.fs import EXIT_STORAGE, StorageFailure
    from batchd.durable import CrossDeviceError
    from batchd.journal import JournalUnreadable
    from batchd.plugins import PluginError

    try:
        daemon = early["daemon"] = Daemon(settings, once=once, emulator=emulator)
        if early["stop"]:
            daemon.stopping.set()
        code = daemon.run()
    except (ConfigError, PluginError, JournalUnreadable) as error:
        # (A journal that cannot be read is not mended by a restart either: the unit must not loop.)
        raise ConfigProblem(str(error)) from None
    except (AlreadyRunning, EmulatorFailed) as error:
        raise click.ClickException(str(error)) from None
    except CrossDeviceError as error:
        raise click.ClickException(f"{error}; keep inbox, outbox and state_dir on one filesystem"
                                   " (under one folder, say)") from None
    except StorageFailure as failure:  # the daemon reports its own; this is one while stopping
        logging.getLogger("batchd").critical(fatal_storage_message(failure))
        code = EXIT_STORAGE
    finally:
        if emulator is not None:
            emulator.stop()  # (the daemon stopped it, unless it failed before it had started)
    sys.exit(code)
