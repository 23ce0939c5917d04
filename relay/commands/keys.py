"""`postroom keys`: create, list and revoke API keys (also the SMTP AUTH passwords)."""

from __future__ import annotations

from typing import Any

import click

from relay.commands.context import emit, fail, settings_of, with_spool
from store import Scope, format_time, normalise_domain


@click.group()
def keys() -> None:
    """Manage API keys (also the SMTP AUTH passwords)."""


@keys.command("create")
@click.option("--name", required=True, help="What the key is for.")
@click.option("--scope", type=click.Choice(["send", "full"]), default="full", show_default=True)
@click.option(
    "--sender-domain",
    "sender_domains",
    multiple=True,
    help="Allow sending only from this domain (repeatable). Default: any domain.",
)
@click.option(
    "--test", "is_test", is_flag=True,
    help="Test mode: messages are accepted, stored and evented, never sent.",
)
@click.option(
    "--rate-limit", type=click.IntRange(min=0), default=None,
    help="Requests per minute for this key (0: unlimited). Default: api.rate_limit_per_minute.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_create(
    ctx: click.Context, name: str, scope: str, sender_domains: tuple[str, ...], is_test: bool,
    rate_limit: int | None, as_json: bool,
) -> None:
    """Create a key; it is shown once and stored only as a digest."""
    settings = settings_of(ctx)
    for domain in sender_domains:
        try:
            normalise_domain(domain)
        except ValueError as exc:
            fail(f"--sender-domain: {exc}")
    new = with_spool(
        settings,
        lambda spool: spool.create_key(
            name, Scope(scope), sender_domains, is_test=is_test, rate_limit=rate_limit
        ),
    )
    domains = list(new.key.sender_domains)
    data = {"id": new.key.id, "key": new.secret, "name": name, "scope": scope,
            "sender_domains": domains, "test": is_test, "rate_limit": rate_limit}
    emit(
        data,
        as_json,
        lambda: click.echo(
            f"id:    {new.key.id}\nkey:   {new.secret}\nscope: {scope}\n"
            + (f"sender domains: {', '.join(domains)}\n" if domains else "")
            + ("test mode: messages are stored, never sent\n" if is_test else "")
            + (f"rate limit: {rate_limit}/min\n" if rate_limit is not None else "")
            + "The key is shown only now: store it safely."
        ),
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """List keys (never their secrets)."""
    settings = settings_of(ctx)
    found = with_spool(settings, lambda spool: spool.list_keys())
    data: list[dict[str, Any]] = [
        {
            "id": k.id,
            "name": k.name,
            "hint": k.hint + "…",
            "scope": k.scope.value,
            "created_at": format_time(k.created_at),
            "revoked_at": format_time(k.revoked_at) if k.revoked_at else None,
            "sender_domains": list(k.sender_domains),
            "test": k.is_test,
            "rate_limit": k.rate_limit,
        }
        for k in found
    ]

    def human() -> None:
        for row in data:
            state = "revoked" if row["revoked_at"] else "active"
            domains = ",".join(row["sender_domains"]) or "*"
            click.echo(
                f"{row['id']}  {row['hint']:<10} {row['scope']:<5} {state:<8} {row['name']}"
                f"  from={domains}" + ("  test" if row["test"] else "")
                + (f"  rate={row['rate_limit']}/min" if row["rate_limit"] is not None else "")
            )

    emit(data, as_json, human)


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke a key; it stops working at once, over HTTP and SMTP."""
    settings = settings_of(ctx)
    with_spool(settings, lambda spool: spool.revoke_key(key_id))
    click.echo(f"revoked {key_id}")
