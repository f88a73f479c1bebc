"""Acting on jobs through the inbox: ``batchd submit`` drops a manifest (checked first), ``cancel`` and
``approve`` drop a request for the daemon, ``retry`` drops what failed or expired of a finished job."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from pathlib import Path

import click

from batchd.cli.common import Context, config_origin, pass_context, reading_journal
from batchd.config import Settings


@click.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--no-model-check", is_flag=True,
              help="Do not check the manifest's model against the provider's model list.")
@click.option("--force", is_flag=True,
              help="Run it even if a job with the same content ran before (the copy dropped gets force = true).")
@pass_context
def submit(ctx: Context, manifest: Path, no_model_check: bool, force: bool) -> None:
    """Drop MANIFEST into the inbox atomically (validated first), with the input file it names.

    The input file (``input = "reviews.csv"``, relative to MANIFEST's folder) is copied into the
    inbox first, at the same relative path, so the daemon never sees the manifest without it.
    An identical file already there is reused; a different one is never overwritten. The model
    must be one the provider serves (``check_models``; its list is cached in the state dir).

    A manifest whose content (its bytes and its input file's) a job already ran is rejected as a
    duplicate; --force drops a copy with ``force = true`` added, which the daemon runs again.
    """
    from batchd.drop import drop_file, drop_input
    from batchd.manifest import ManifestError, load_manifest

    settings = ctx.settings()
    try:
        job = load_manifest(manifest, root=manifest.parent, tasks=ctx.tasks(), limits=settings.limits)
    except ManifestError as error:
        raise click.ClickException(str(error.capped(settings.limits.error_chars))) from None
    _existing_inbox(settings)
    if settings.check_models and not no_model_check:
        problem = _model_problem(settings, job.model or settings.model)
        if problem is not None:
            raise click.ClickException(f"{manifest.name}: {problem} (nothing was dropped into the inbox)")
    reused = []
    for input_path in job.input_files():
        destination = settings.inbox / input_path.relative_to(manifest.parent.resolve())
        try:
            if drop_input(input_path, destination):
                click.echo(f"copied input {destination}")
            else:
                reused.append((input_path, destination))
        except FileExistsError:
            raise click.ClickException(
                f"{manifest.name} names input {input_path.name!r}, but the inbox already has a different "
                f"{destination}; rename the input (and the manifest's input = ...) or remove the old one"
            ) from None
    content = _forced(manifest, job) if force else None
    destination = drop_file(manifest, settings.inbox, content=content)
    for input_path, kept in reused:
        # The daemon may have claimed the job that last named this input meanwhile, which takes it
        # along: put it back while the manifest waits (one that does not parse waits out
        # incomplete_grace_seconds before it is rejected).
        if not kept.exists() and destination.exists():
            drop_input(input_path, kept)
    click.echo(f"submitted {destination}{' (force = true: run even if the same content ran before)' if force else ''}")


def _forced(manifest: Path, job) -> bytes | None:
    """MANIFEST's bytes with ``force = true`` set (None: it sets it already)."""
    if job.common.force:
        return None
    raw = manifest.read_bytes()
    if "force" in job.common.model_fields_set:
        raise click.ClickException(f"{manifest.name} sets force = false: remove it to submit with --force")
    if manifest.suffix.lower() == ".json":
        document = json.loads(raw)
        return (json.dumps({"force": True, **document}, indent=2, ensure_ascii=False) + "\n").encode()
    # TOML: a key before the first table is a top-level key, whatever follows.
    return b"force = true  # batchd submit --force: run even if the same content ran before\n" + raw


def _model_problem(settings: Settings, model: str) -> str | None:
    """Why the provider cannot run ``model`` (None: it can, or nobody could say): from the model list
    the daemon cached in the state dir when it is fresh, else from the provider (a throw-away emulator
    for ``provider = "emulator"``, started only if the cache does not answer)."""
    from batchd.model_check import ModelCheck, model_source, models_cache_path

    with contextlib.ExitStack() as stack:
        opened = []

        def provider():
            if not opened:
                opened.append(stack.enter_context(_provider_for_cli(settings)))
            return opened[0]

        cache = models_cache_path(settings.state_dir)
        return ModelCheck(provider, model_source(settings), cache if settings.state_dir.is_dir() else None) \
            .problem(model)


@contextlib.contextmanager
def _provider_for_cli(settings: Settings):
    """The configured provider; with ``provider = "emulator"``, one of its own on a throw-away emulator."""
    import tempfile

    from batchd.provider import Provider

    if settings.provider != "emulator":
        with Provider.from_settings(settings) as provider:  # a missing key: the check says it cannot ask
            yield provider
        return
    from batchd.emulator.server import EmulatorServer

    # In this process: it only answers models.list and models.get, over HTTP through the SDK as the daemon's.
    logging.getLogger("batchd.emulator").setLevel(logging.WARNING)  # its start-up line is no news here
    with tempfile.TemporaryDirectory(prefix="batchd-models-") as folder, EmulatorServer(folder) as emulator, \
            Provider.from_settings(settings, base_url=emulator.base_url, api_key="batchd-emulator") as provider:
        yield provider


def _existing_inbox(settings: Settings) -> Path:
    """The inbox to drop into; a clear error when there is none (run from another folder, say)."""
    if not settings.inbox.is_dir():
        raise click.ClickException(f"no inbox at {settings.inbox} ({config_origin(settings)}); give the config "
                                   f"with --config PATH or BATCHD_CONFIG, or start `batchd run` there first")
    return settings.inbox


def _drop_request(settings: Settings, name: str, verb: str, noun: str) -> None:
    """Drop an empty ``NAME.<verb>`` into the inbox (atomically, once) for the daemon to act on."""
    from batchd.drop import drop_bytes

    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise click.ClickException(f"{name!r} is not a job name or id (the manifest's name without "
                                   f"extension, no folders)")
    try:
        drop_bytes(b"", _existing_inbox(settings) / f"{name}.{verb}")
    except FileExistsError:
        click.echo(f"{noun} of {name} was already requested")
        return
    except OSError as error:
        if error.errno != errno.ENAMETOOLONG:
            raise
        raise click.ClickException(f"{name[:60]!r}… is too long a name for the request file {verb} drops into the "
                                   f"inbox: give the job's id instead (`batchd status` shows it)") from None
    click.echo(f"{noun} requested for {name}")


@click.command()
@click.argument("name")
@pass_context
def cancel(ctx: Context, name: str) -> None:
    """Cancel job NAME (the manifest's name without extension, or a job id)."""
    _drop_request(ctx.settings(), name, "cancel", "cancel")


@click.command()
@click.argument("name")
@pass_context
def approve(ctx: Context, name: str) -> None:
    """Release job NAME held over budget (the manifest's name without extension, or a job id).

    The same as dropping NAME.approve into the inbox: the daemon records the approval in its
    journal, then removes the file. Approving a job not yet held lets it skip its budget check.
    """
    _drop_request(ctx.settings(), name, "approve", "approval")


@click.command("retry")
@click.argument("name")
@click.option("--failed", is_flag=True, help="Send again the requests that failed (any error but \"expired\").")
@click.option("--expired", is_flag=True, help="Send again the requests whose remote batch expired.")
@pass_context
def retry_command(ctx: Context, name: str, failed: bool, expired: bool) -> None:
    """Send again what failed or expired of job NAME (the manifest's name without extension, or a job id).

    Takes the latest finished job of that name and drops NAME.retry-N (its manifest, plus retry_of)
    and NAME.retry-N.keys.jsonl (the keys of the requests to send) into the inbox: the daemon runs it
    as a new job with only those requests, delivered to outbox/NAME.retry-N. Neither flag means both.
    An input file the job read must still be in the inbox, unchanged.

    Exit status: 0 when the retry was dropped, or there was nothing to retry; 1 when it could not be
    made (no such job, not finished, its outbox folder or input file gone), with the reason.
    """
    from batchd.retry import RetryError, finished_job, retry

    settings = ctx.settings()
    if not failed and not expired:
        failed = expired = True
    with reading_journal(settings) as journal:
        if journal is None:
            raise click.ClickException(f"no job named {name!r}")
        try:
            job = finished_job(journal, name)
            made = retry(settings, journal, ctx.tasks(), job, failed=failed, expired=expired)
        except RetryError as error:
            raise click.ClickException(str(error)) from None
    chosen = " or ".join(kind for kind, wanted in (("failed", failed), ("expired", expired)) if wanted)
    if made.manifest is None:
        click.echo(f"job {job.id} ({job.source}, {job.outcome}): nothing to retry (no {chosen} request)")
        return
    click.echo(f"retrying {made.failed + made.expired} request(s) of job {job.id} ({job.source}): "
               f"{made.failed} failed, {made.expired} expired")
    click.echo(f"submitted {made.manifest} with keys {made.keys}")
