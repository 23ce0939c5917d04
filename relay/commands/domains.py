"""`postroom domains`: sending domains, their DKIM keys and the DNS records to publish."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from api.errors import damaged_key_message
from api.models import DomainCreate, DomainOut
from relay.commands.context import emit, fail, settings_of, with_spool
from store import DomainKeys, Spool, UnreadableKeys

if TYPE_CHECKING:
    from relay.domains import Domains


@click.group()
def domains() -> None:
    """Sending domains and their DKIM keys."""


@domains.command("add")
@click.argument("name")
@click.option("--selector", default="postroom", show_default=True, help="DKIM selector.")
@click.option(
    "--algorithm",
    type=click.Choice(["rsa", "both"]),
    default="rsa",
    show_default=True,
    help="rsa: RSA-2048; both: RSA-2048 and ed25519 (two signatures; never ed25519 alone).",
)
@click.option("--sender-name", help="Default From: display name when a message has none.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def domains_add(
    ctx: click.Context, name: str, selector: str, algorithm: str, sender_name: str | None,
    as_json: bool,
) -> None:
    """Add a sending domain: generate its DKIM keys and print the DNS records to publish."""
    from relay.domains import Domains

    try:
        wanted = DomainCreate(
            name=name, selector=selector, algorithm="both" if algorithm == "both" else "rsa",
            default_sender_name=sender_name,
        )
    except ValidationError as exc:
        fail("; ".join(f"{e['loc'][0]}: {str(e['msg']).removeprefix('Value error, ')}"
                       for e in exc.errors()))
    settings = settings_of(ctx)
    tools = Domains(settings)
    keys = tools.generate(wanted.name, wanted.selector, algorithm == "both", time.time())
    keys = dataclasses.replace(keys, default_sender_name=wanted.default_sender_name)

    async def add(spool: Spool) -> None:
        await spool.add_domain(keys)

    with_spool(settings, add)
    out = DomainOut.of(keys, tools.records(keys)).to_json()
    emit(out, as_json, lambda: _show_domain(out, f"added {keys.name}; publish these records:"))


def _show_domain(out: dict[str, Any], title: str) -> None:
    click.echo(title)
    for record in out["records"]:
        # Zone files hold at most 255 bytes per string; resolvers join the strings.
        value = record["value"]
        chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
        status = "" if record["status"] == "unverified" else f"  ; {record['status']}"
        click.echo(f"{record['name']}. {record['type']} {chunks}{status}")
        if record.get("found") and record["status"] != "ok":
            click.echo(f"    found: {'; '.join(record['found'])}")
        if record.get("detail"):
            click.echo(f"    {record['detail']}")


@domains.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def domains_list(ctx: click.Context, as_json: bool) -> None:
    """List sending domains (never their keys)."""
    from relay.domains import Domains

    settings = settings_of(ctx)
    tools = Domains(settings)
    found = with_spool(settings, lambda spool: spool.inspect_domains())
    data = [_domain_out(tools, k, damage) for k, damage in found]

    def human() -> None:
        for row in data:
            name = f"  sender name {row['default_sender_name']!r}" if row[
                "default_sender_name"] else ""
            click.echo(f"{row['name']}  selector={row['selector']} {row['algorithm']}{name}")
            if row["problem"]:
                click.echo(f"  {row['problem']}")

    emit(data, as_json, human)


@domains.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def domains_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show a sending domain and the DNS records it should publish."""
    from relay.domains import Domains

    settings = settings_of(ctx)
    keys, damage = with_spool(
        settings, lambda spool: spool.inspect_domain(name.rstrip(".").lower())
    )
    out = _domain_out(Domains(settings), keys, damage)
    title = f"{keys.name}: publish these records:" if damage is None else f"{keys.name}:"
    emit(out, as_json, lambda: _show_domain(out, title))
    if damage is not None:
        raise click.ClickException(out["problem"])


def _domain_out(tools: Domains, keys: DomainKeys, damage: UnreadableKeys | None) -> dict[str, Any]:
    """A domain as `domains list`/`show` print it; a damaged key is shown, not raised."""
    if damage is not None:
        return DomainOut.of(keys, [], damaged_key_message(damage)).to_json()
    return DomainOut.of(keys, tools.records(keys)).to_json()


@domains.command("verify")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def domains_verify(ctx: click.Context, name: str, as_json: bool) -> None:
    """Look the domain's records up in DNS now: each ok, missing, wrong or unknown (the lookup
    failed); exit 1 unless all are ok."""
    from relay.domains import Domains

    settings = settings_of(ctx)
    tools = Domains(settings)

    async def work(spool: Spool) -> dict[str, Any]:
        keys = await spool.get_domain(name.rstrip(".").lower())
        out = DomainOut.of(keys, await tools.verify(keys)).to_json()
        out["verified"] = all(r["status"] == "ok" for r in out["records"])
        return out

    out = with_spool(settings, work)
    emit(out, as_json, lambda: _show_domain(out, f"{out['name']}: DNS records now:"))
    if not out["verified"]:
        sys.exit(1)


@domains.command("remove")
@click.argument("name")
@click.pass_context
def domains_remove(ctx: click.Context, name: str) -> None:
    """Remove a sending domain and its keys."""
    settings = settings_of(ctx)
    with_spool(settings, lambda spool: spool.remove_domain(name.rstrip(".").lower()))
    click.echo(f"removed {name.rstrip('.').lower()}")
