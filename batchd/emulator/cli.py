"""``batchd emulator``: the local Gemini Batch API emulator as a foreground service."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import click

from batchd.emulator.faults import parse_fault
from batchd.emulator.models import DEFAULT_MODELS


def _exit_when_stdin_closes() -> None:
    """Stop cleanly once the parent is gone: its end of our stdin pipe closes even when it is SIGKILLed."""

    def wait_for_eof() -> None:
        # The descriptor, not sys.stdin: a thread blocked inside the buffered reader holds its lock, and an
        # interpreter exiting for another reason (a state it cannot read) then aborts trying to take it.
        while os.read(0, 65536):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_for_eof, name="emulator-parent-watch", daemon=True).start()


def _check_fault(_ctx: click.Context, _param: click.Parameter, specs: tuple[str, ...]) -> tuple[str, ...]:
    for spec in specs:
        try:
            parse_fault(spec)
        except ValueError as error:
            raise click.BadParameter(str(error)) from None
    return specs


@click.command("emulator")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8765, show_default=True, type=int, help="Port to listen on (0: any free port).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where jobs, files and results persist across restarts (default: a temporary directory).")
@click.option("--job-seconds", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="How long a batch job takes from PENDING to SUCCEEDED.")
@click.option("--expire-seconds", default=48 * 3600.0, show_default=True, type=click.FloatRange(min=0),
              help="Jobs not finished after this long become EXPIRED; files are kept this long.")
@click.option("--cancel-seconds", type=click.FloatRange(min=0), default=None,
              help="How long a cancel takes to make a job CANCELLED (default: a tenth of --job-seconds, at most 5).")
@click.option("--concurrent-batches", default=100, show_default=True, type=click.IntRange(min=0),
              help="Batch jobs pending or running at once, as Google's limit per project; a create beyond it "
                   "is refused with 429 RESOURCE_EXHAUSTED (0: no limit).")
@click.option("--api-key", help="Accept only this x-goog-api-key (default: any non-empty key).")
@click.option("--model", "models", multiple=True,
              help=f"A known model id (repeatable; replaces the default list: {', '.join(DEFAULT_MODELS)}; "
                   "only the listed ids are then accepted).")
@click.option("--strict-models", is_flag=True,
              help="Accept only the listed models, not also any id of Google's current model families.")
@click.option("--fault", "faults", multiple=True, callback=_check_fault,
              help="Inject a fault, e.g. 503, http=429:0.2, slow=3@get, fail-requests=0.1 (repeatable; "
                   "see docs/emulator.md).")
@click.option("--responder", "responder_spec", metavar="MODULE:NAME",
              help="Answer requests with this Responder instead of the built-in deterministic one.")
@click.option("--access-log/--no-access-log", default=False, show_default=True, help="Log every request.")
@click.option("--exit-with-parent", is_flag=True, hidden=True,
              help="Shut down when standard input closes (the embedded emulator of `batchd run`).")
def emulator_command(host: str, port: int, state_dir: Path | None, job_seconds: float, expire_seconds: float,
                     cancel_seconds: float | None, concurrent_batches: int, api_key: str | None, models: tuple[str, ...],
                     strict_models: bool, faults: tuple[str, ...],
                     responder_spec: str | None, access_log: bool, exit_with_parent: bool) -> None:
    """Serve a local Gemini Batch API emulator until SIGINT/SIGTERM.

    Point google-genai at it with http_options.base_url or GOOGLE_GEMINI_BASE_URL.
    """
    from batchd.emulator.responder import load_responder
    from batchd.emulator.server import serve
    from batchd.emulator.store import StateError

    responder = load_responder(responder_spec) if responder_spec else None
    if exit_with_parent:
        _exit_when_stdin_closes()
    try:
        serve(state_dir, host=host, port=port, job_seconds=job_seconds, expire_seconds=expire_seconds,
              cancel_seconds=cancel_seconds, concurrent_batches=concurrent_batches, api_key=api_key,
              models=list(models) or None, strict_models=strict_models, faults=list(faults), responder=responder,
              access_log=access_log)
    except StateError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:  # its state directory unwritable, the port taken: one line, not a traceback
        raise click.ClickException(f"the emulator cannot start: {error}") from None
