"""``batchd estimate``: what a manifest would cost, priced as the daemon would before submitting it."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from batchd.cli.common import ConfigProblem, Context, reading_journal, pass_context
from batchd.config import ConfigError, Settings


@click.command()
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
    with reading_journal(settings) as journal:
        observed = journal.observed_output(job.task, model) if journal is not None else None
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
