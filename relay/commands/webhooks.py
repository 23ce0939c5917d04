"""`postroom webhooks`: add, list, remove and test webhook endpoints."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click
from pydantic import ValidationError

from api.models import WebhookCreate, WebhookOut
from config import Settings
from relay.commands.context import emit, fail, settings_of, with_spool
from store import AttemptResult, NewWebhook, Spool, UrlRefusal

if TYPE_CHECKING:
    from relay.egress import Egress


def _egress(settings: Settings) -> Egress:
    # Imported here, as `relay.webhooks` below: httpx and the dispatcher were a fifth of every
    # `postroom` command's start, and only `add` and `test` reach the network.
    from relay.egress import Egress, build_resolver

    return Egress(build_resolver(settings), settings.webhooks.allow_private_networks)


@click.group()
def webhooks() -> None:
    """Manage webhook endpoints."""


@webhooks.command("add")
@click.argument("url")
@click.option(
    "--events", "event_types", default="*", show_default=True,
    help="Comma-separated event types, or * for all.",
)
@click.option("--description", default="", help="What the endpoint is for.")
@click.option("--disabled", is_flag=True, help="Create it disabled.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def webhooks_add(
    ctx: click.Context, url: str, event_types: str, description: str, disabled: bool,
    as_json: bool,
) -> None:
    """Add an endpoint; its signing secret is shown once."""
    settings = settings_of(ctx)
    try:
        wanted = WebhookCreate(
            url=url, events=[t.strip() for t in event_types.split(",") if t.strip()],
            description=description, enabled=not disabled,
        )
    except ValidationError as exc:
        fail("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors()))

    async def work(spool: Spool) -> NewWebhook | UrlRefusal:
        target = await _egress(settings).target(wanted.url)
        if isinstance(target, UrlRefusal):
            return target
        return await spool.create_webhook(
            wanted.url, tuple(wanted.events), wanted.description, wanted.enabled
        )

    new = with_spool(settings, work)
    if isinstance(new, UrlRefusal):
        fail(f"{new.slug}: {new.message}")
    data = {**WebhookOut.of(new.endpoint).model_dump(), "secret": new.secret}
    emit(
        data,
        as_json,
        lambda: click.echo(
            f"id:     {data['id']}\nurl:    {data['url']}\nevents: {','.join(data['events'])}\n"
            f"secret: {new.secret}\nThe secret is shown only now: store it safely."
        ),
    )


@webhooks.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def webhooks_list(ctx: click.Context, as_json: bool) -> None:
    """List endpoints (never their secrets)."""
    settings = settings_of(ctx)
    found = with_spool(settings, lambda spool: spool.list_webhooks())
    data = [WebhookOut.of(e).model_dump() for e in found]

    def human() -> None:
        for row in data:
            state = "enabled" if row["enabled"] else f"disabled {row['disabled_reason'] or ''}"
            click.echo(f"{row['id']}  {row['url']}  {','.join(row['events'])}  {state.strip()}")

    emit(data, as_json, human)


@webhooks.command("remove")
@click.argument("webhook_id")
@click.pass_context
def webhooks_remove(ctx: click.Context, webhook_id: str) -> None:
    """Remove an endpoint with its pending deliveries and attempt log."""
    settings = settings_of(ctx)
    with_spool(settings, lambda spool: spool.delete_webhook(webhook_id))
    click.echo(f"removed {webhook_id}")


@webhooks.command("test")
@click.argument("webhook_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def webhooks_test(ctx: click.Context, webhook_id: str, as_json: bool) -> None:
    """Send a signed `webhook.test` event now and show the answer (exit 1 unless 2xx)."""
    settings = settings_of(ctx)

    async def work(spool: Spool) -> AttemptResult:
        from relay.webhooks import WebhookDispatcher

        endpoint = await spool.get_webhook(webhook_id)
        dispatcher = WebhookDispatcher(spool, settings, _egress(settings))
        try:
            return await dispatcher.send_test(endpoint)
        finally:
            await dispatcher.stop(0)

    result = with_spool(settings, work)
    data = {
        "status_code": result.status_code,
        "success": result.is_success,
        "latency_ms": round(result.latency * 1000),
        "error": result.error,
    }
    emit(
        data,
        as_json,
        lambda: click.echo(
            f"{webhook_id}: {result.status_code or 'no response'} in {data['latency_ms']} ms"
            + (f" ({result.error})" if result.error else "")
        ),
    )
    if not result.is_success:
        sys.exit(1)
