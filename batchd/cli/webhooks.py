"""``batchd webhooks``: the project's static Gemini webhooks, registered, listed and deleted."""

from __future__ import annotations

import json

import click

from batchd.cli.common import Context, pass_context
from batchd.config import Settings


@click.group("webhooks")
def webhooks_group() -> None:
    """Static Gemini webhooks of the project (the SDK's client.webhooks): register, list, delete.

    A static webhook hears of every batch's end (batch.succeeded, batch.failed, batch.cancelled,
    batch.expired); its deliveries are verified with the secret `register` prints once: keep it like the
    API key, as `webhook_secret` (or BATCHD_WEBHOOK_SECRET). See docs/web.md.
    """


WEBHOOK_EVENTS = ["batch.succeeded", "batch.failed", "batch.cancelled", "batch.expired"]


def _webhook_client(settings: Settings):
    from batchd.provider import Provider

    if settings.provider == "emulator":
        raise click.ClickException('the embedded emulator lives only as long as the daemon: webhooks are registered'
                                   ' with provider = "gemini" (GOOGLE_GEMINI_BASE_URL may name another emulator)')
    provider = Provider.from_settings(settings)
    return provider, provider._single_shot_client.webhooks


@webhooks_group.command("register")
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


@webhooks_group.command("list")
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


@webhooks_group.command("delete")
@click.argument("webhook_id")
@pass_context
def webhooks_delete(ctx: Context, webhook_id: str) -> None:
    """Delete static webhook WEBHOOK_ID."""
    provider, client = _webhook_client(ctx.settings())
    with provider:
        client.delete(id=webhook_id)
    click.echo(f"deleted webhook {webhook_id}")
