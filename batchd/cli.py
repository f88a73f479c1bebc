"""The ``batchd`` command line."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import click

from batchd import __version__
from batchd.config import ConfigError, Settings, load_settings
from batchd.logs import FORMATS, LEVELS, setup_logging


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
        from batchd.logs import setup_logging

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


def no_config_file(settings: Settings) -> str:
    """What batchd says when it found no config file: where it looked, and the defaults it uses instead."""
    return (f"no config file: {config_looked_for()}; using the built-in defaults: inbox {settings.inbox}, outbox "
            f"{settings.outbox}, state_dir {settings.state_dir}, provider {settings.provider} "
            f"(`batchd init DIR` makes a working folder with a config.toml)")


class _Commands(click.Group):
    """batchd's commands, with ``batchd emulator`` imported only when it is used: it brings uvicorn and
    Starlette, which no other command needs (the daemon starts its embedded emulator as a child process)."""

    _LAZY = {"emulator": ("batchd.emulator.cli", "emulator_command")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._LAZY])

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


@main.command()
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

    from batchd.daemon import AlreadyRunning, Daemon, fatal_storage_message
    from batchd.fs import EXIT_STORAGE, StorageFailure
    from batchd.durable import CrossDeviceError
    from batchd.plugins import PluginError

    settings = ctx.settings(**overrides)
    try:
        daemon = early["daemon"] = Daemon(settings, once=once)
        if early["stop"]:
            daemon.stopping.set()
        code = daemon.run()
    except (ConfigError, PluginError) as error:
        raise ConfigProblem(str(error)) from None
    except AlreadyRunning as error:
        raise click.ClickException(str(error)) from None
    except CrossDeviceError as error:
        raise click.ClickException(f"{error}; keep inbox, outbox and state_dir on one filesystem"
                                   " (under one folder, say)") from None
    except StorageFailure as failure:  # the daemon reports its own; this is one while stopping
        logging.getLogger("batchd").critical(fatal_storage_message(failure))
        code = EXIT_STORAGE
    sys.exit(code)


@main.command()
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
    from batchd.inbox import drop_file, drop_input
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


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--local", is_flag=True, help="Count tokens by the local rule, without a countTokens call.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@pass_context
def estimate(ctx: Context, manifest: Path, local: bool, as_json: bool) -> None:
    """Price MANIFEST as the daemon would before submitting it, and what the batch price saves; submits nothing.

    Prompt tokens are counted with the provider's countTokens (a sample of the prompts; with
    ``provider = "emulator"`` a throw-away emulator answers), unless --local or ``cost.count_tokens =
    false``. Output is priced by what earlier jobs of the same task and model produced (from this
    state dir's journal), else by max_output_tokens or ``cost.default_output_tokens``. With the request
    cache on (``cache``), requests it answers now are left out. Exits 1 when the manifest is invalid or
    its model has no price.
    """
    from batchd.costs import CostHooks, JobInfo, RequestStream
    from batchd.manifest import ManifestError, load_manifest
    from batchd.plugins import PluginError, get_plugin_manager

    settings = ctx.settings()
    try:
        job = load_manifest(manifest, root=manifest.parent, tasks=ctx.tasks(), limits=settings.limits)
        costs = CostHooks(get_plugin_manager(settings.plugins_dir, frozenset(settings.disabled_plugins)))
    except ManifestError as error:
        raise click.ClickException(str(error.capped(settings.limits.error_chars))) from None
    except PluginError as error:
        raise ConfigProblem(str(error)) from None
    if not costs.estimates:
        raise click.ClickException("no cost plugin is enabled (disabled_plugins?): nothing can price the job")
    model = job.model or settings.model
    info = JobInfo(id=manifest.stem, name=manifest.stem, manifest=manifest.name, task=job.task, model=model,
                   kind=job.kind)
    journal = _open_journal(settings)
    observed = journal.observed_output(job.task, model) if journal is not None else None
    if journal is not None:
        journal.close()
    requests = job.requests
    if job.common.cache if job.common.cache is not None else settings.cache:
        from batchd.cache import cache_path, uncached
        from batchd.encoding import EmbedRequestEncoder, RequestEncoder

        # What the request cache of this state dir answers now is not sent, so not priced.
        encode = (EmbedRequestEncoder() if job.kind == "embed" else RequestEncoder(model)).encode

        def requests():
            return uncached(job.requests(), cache_path(settings.state_dir), job.kind, model, encode)
    with _token_counter(settings, model, local) as count_tokens:
        result = costs.estimate(info, RequestStream(requests), count_tokens, settings, observed)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print_estimate(manifest, model, result or {})
    if not result or result.get("cost") is None:
        sys.exit(1)


def _print_estimate(manifest: Path, model: str, result: dict) -> None:
    currency = result.get("currency", "")
    if result.get("cost") is None:
        click.echo(f"{manifest.name}: {result.get('error') or 'no price'}", err=True)
        return
    lines = [
        f"{manifest.name}: {result.get('requests', '?')} requests to {model}",
        f"  input tokens   {result.get('input_tokens', '?'):>14}  ({result.get('method', '')})",
        f"  output tokens  {result.get('output_tokens', '?'):>14}  ({result.get('output_method', '')})",
        f"  batch price    {result['cost']:>14.6f} {currency}",
    ]
    if result.get("standard_cost") is not None:
        lines += [f"  standard price {result['standard_cost']:>14.6f} {currency}  (the interactive API)",
                  f"  saving         {result['saving']:>14.6f} {currency}"]
    click.echo("\n".join(lines))


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


@contextlib.contextmanager
def _token_counter(settings: Settings, model: str, local: bool):
    """countTokens for ``model`` through the configured provider (a throw-away emulator for
    ``provider = "emulator"``), or None for the local rule."""
    if local or not settings.cost.count_tokens:
        yield None
        return
    import tempfile

    from batchd.provider import Provider

    if settings.provider != "emulator":
        try:
            provider = Provider.from_settings(settings)
        except ConfigError as error:
            raise ConfigProblem(f"{error} (or pass --local to count tokens without the service)") from None
        with provider:
            yield lambda texts: provider.count_tokens(model, texts)
        return
    from batchd.emulator.process import EmulatorProcess

    with tempfile.TemporaryDirectory(prefix="batchd-estimate-") as folder:
        emulator = EmulatorProcess(Path(folder), job_seconds=settings.emulator.job_seconds)
        emulator.start()
        try:
            with Provider.from_settings(settings, base_url=emulator.base_url, api_key="batchd-emulator") as provider:
                yield lambda texts: provider.count_tokens(model, texts)
        finally:
            emulator.stop()


def _existing_inbox(settings: Settings) -> Path:
    """The inbox to drop into; a clear error when there is none (run from another folder, say)."""
    if not settings.inbox.is_dir():
        where = (f"config file {settings.config_file}" if settings.config_file is not None
                 else f"no config file: {config_looked_for()}")
        raise click.ClickException(f"no inbox at {settings.inbox} ({where}); give the config with --config PATH "
                                   f"or BATCHD_CONFIG, or start `batchd run` there first")
    return settings.inbox


def _drop_request(settings: Settings, name: str, verb: str, noun: str) -> None:
    """Drop an empty ``NAME.<verb>`` into the inbox (atomically, once) for the daemon to act on."""
    from batchd.inbox import drop_bytes

    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise click.ClickException(f"{name!r} is not a job name or id (the manifest's name without "
                                   f"extension, no folders)")
    try:
        drop_bytes(b"", _existing_inbox(settings) / f"{name}.{verb}")
    except FileExistsError:
        click.echo(f"{noun} of {name} was already requested")
        return
    click.echo(f"{noun} requested for {name}")


@main.command()
@click.argument("name")
@pass_context
def cancel(ctx: Context, name: str) -> None:
    """Cancel job NAME (the manifest's name without extension, or a job id)."""
    _drop_request(ctx.settings(), name, "cancel", "cancel")


@main.command()
@click.argument("name")
@pass_context
def approve(ctx: Context, name: str) -> None:
    """Release job NAME held over budget (the manifest's name without extension, or a job id).

    The same as dropping NAME.approve into the inbox: the daemon records the approval in its
    journal, then removes the file. Approving a job not yet held lets it skip its budget check.
    """
    _drop_request(ctx.settings(), name, "approve", "approval")


@main.command("retry")
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
    journal = _open_journal(settings)
    if journal is None:
        raise click.ClickException(f"no job named {name!r}")
    try:
        job = finished_job(journal, name)
        made = retry(settings, journal, ctx.tasks(), job, failed=failed, expired=expired)
    except RetryError as error:
        raise click.ClickException(str(error)) from None
    finally:
        journal.close()
    chosen = " or ".join(kind for kind, wanted in (("failed", failed), ("expired", expired)) if wanted)
    if made.manifest is None:
        click.echo(f"job {job.id} ({job.source}, {job.outcome}): nothing to retry (no {chosen} request)")
        return
    click.echo(f"retrying {made.failed + made.expired} request(s) of job {job.id} ({job.source}): "
               f"{made.failed} failed, {made.expired} expired")
    click.echo(f"submitted {made.manifest} with keys {made.keys}")


@main.group()
def webhooks() -> None:
    """Static Gemini webhooks of the project (the SDK's client.webhooks): register, list, delete.

    A static webhook hears of every batch's end (batch.succeeded, batch.failed, batch.cancelled,
    batch.expired); its deliveries are verified with the secret `register` prints once: keep it like the
    API key, as `webhook_secret` (or BATCHD_WEBHOOK_SECRET). See docs/web.md.
    """


WEBHOOK_EVENTS = ["batch.succeeded", "batch.failed", "batch.cancelled", "batch.expired"]


def _webhook_client(settings: Settings):
    from google import genai

    from batchd.provider import Provider

    if settings.provider == "emulator":
        raise click.ClickException('the embedded emulator lives only as long as the daemon: webhooks are registered'
                                   ' with provider = "gemini" (GOOGLE_GEMINI_BASE_URL may name another emulator)')
    provider = Provider.from_settings(settings)
    return provider, provider._single_shot_client.webhooks


@webhooks.command("register")
@click.argument("url")
@click.option("--name", default="batchd", show_default=True, help="The webhook's name.")
@pass_context
def webhooks_register(ctx: Context, url: str, name: str) -> None:
    """Register URL (this daemon's /webhooks/gemini, reachable by Google) for batch events; prints the
    signing secret, once."""
    if not url.startswith(("https://", "http://")):
        raise click.ClickException(f"{url!r} is not an http(s) URL")
    provider, client = _webhook_client(ctx.settings())
    with provider:
        created = client.create(name=name, subscribed_events=WEBHOOK_EVENTS, uri=url)
    click.echo(f"registered webhook {created.id} for {url}")
    click.echo("its signing secret (shown once; set it as webhook_secret or BATCHD_WEBHOOK_SECRET):")
    click.echo(created.new_signing_secret)


@webhooks.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def webhooks_list(ctx: Context, as_json: bool) -> None:
    """The project's static webhooks (secrets shown truncated, as the service gives them)."""
    provider, client = _webhook_client(ctx.settings())
    with provider:
        found = [{"id": w.id, "name": getattr(w, "name", None), "uri": w.uri, "state": str(w.state),
                  "subscribed_events": [str(e) for e in (w.subscribed_events or [])]}
                 for w in (client.list().webhooks or [])]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("no webhooks")
    for w in found:
        click.echo(f"{w['id']}  {w['state']}  {w['uri']}  {', '.join(w['subscribed_events'])}")


@webhooks.command("delete")
@click.argument("webhook_id")
@pass_context
def webhooks_delete(ctx: Context, webhook_id: str) -> None:
    """Delete static webhook WEBHOOK_ID."""
    provider, client = _webhook_client(ctx.settings())
    with provider:
        client.delete(id=webhook_id)
    click.echo(f"deleted webhook {webhook_id}")


def _open_journal(settings: Settings):
    from batchd.journal import Journal, journal_path

    path = journal_path(settings.state_dir)
    if not path.exists():
        return None
    journal = Journal(path, readonly=True)
    if not journal.initialized:  # the daemon has created the file but not yet its tables
        journal.close()
        return None
    return journal


def _job_view(journal, job) -> dict:
    from batchd.views import job_view

    return job_view(journal, job)


#: ``batchd status`` without NAME shows unfinished jobs and those finished this recently.
STATUS_RECENT_SECONDS = 24 * 3600


def _read_jobs(settings: Settings, name: str | None, *, finished_within: float | None = None) -> list[dict]:
    """The jobs named ``name``, else every job; ``finished_within`` (seconds) leaves out jobs finished earlier."""
    journal = _open_journal(settings)
    if journal is None:
        if not settings.state_dir.is_dir():
            # Not "no jobs": this is no batchd's folder (run from elsewhere, or a config not found).
            where = (f"config file {settings.config_file}" if settings.config_file is not None
                     else f"no config file: {config_looked_for()}")
            raise click.ClickException(f"no batchd state at {settings.state_dir} ({where}): batchd has not run "
                                       f"with these settings; give the config with --config PATH or BATCHD_CONFIG")
        return []
    try:
        selected = journal.find_jobs(name) if name else journal.jobs()
        if finished_within is not None and not name:
            since = time.time() - finished_within
            selected = [job for job in selected if job.finished_at is None or job.finished_at >= since]
        return [_job_view(journal, job) for job in selected]
    finally:
        journal.close()


@main.command()
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


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def list_jobs(ctx: Context, as_json: bool) -> None:
    """List every job the journal knows, oldest first."""
    _print_jobs(_read_jobs(ctx.settings(warn_without_config=False), None), as_json)


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


@main.command()
@pass_context
def schema(ctx: Context) -> None:
    """Print the JSON Schema of job manifests (every installed task's, and plugins_dir's)."""
    from batchd.manifest import manifest_json_schema

    click.echo(json.dumps(manifest_json_schema(ctx.tasks()), indent=2))




@main.group("cache")
def cache_group() -> None:
    """The request cache: answers reused by jobs with cache = true (state_dir/cache.sqlite3)."""


def _cache_store(settings: Settings):
    from batchd.cache import CacheStore, cache_path

    return CacheStore(cache_path(settings.state_dir))


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


# -- setting up and looking after an installation --------------------------------------------------


@main.command()
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


@main.group()
def service() -> None:
    """Run batchd as a systemd service."""


@service.command("install")
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


@main.group("config")
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


@main.command()
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
