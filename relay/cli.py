"""The `postroom` command line: set up, serve, and manage keys and the queue.

Owns argument parsing and output (human text, or `--json` for scripts); every command loads the
settings the same way (`--config`, else `POSTROOM_CONFIG`, else `./postroom.toml`, else
`/etc/postroom/postroom.toml`), and a bad config exits 2 with `section.key: reason`, never a
traceback. Work is done through the Spool and the Service, never with SQL here.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import datetime
import ipaddress
import json
import os
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from pydantic import ValidationError

from api.errors import ValidationFailed as ApiValidationFailed
from api.errors import damaged_key_message
from api.models import (
    DomainCreate,
    DomainOut,
    EventItemOut,
    MessageOut,
    StatsOut,
    SuppressionOut,
    TemplateIn,
    TemplateOut,
    WebhookCreate,
    WebhookOut,
    normalise_address,
)
from config import (
    EXAMPLE_CONFIG,
    ConfigError,
    Settings,
    load_settings,
    parse_duration,
    resolve_config_path,
)
from relay import logs
from relay.doctor import Check, has_failure, judge_config, run_checks
from relay.egress import Egress
from relay.egress import build_resolver as build_webhook_resolver
from relay.service import Service, StartupError, tls_paths
from relay.webhooks import WebhookDispatcher
from store import (
    AttemptResult,
    CancelResult,
    Conflict,
    DomainKeys,
    Event,
    EventFilter,
    EventType,
    MessageStatus,
    NewSuppression,
    NewWebhook,
    NotFound,
    RecipientStatus,
    Scope,
    Spool,
    StatsGrouping,
    StoreError,
    Suppression,
    SuppressionFilter,
    SuppressionReason,
    Template,
    UnreadableKeys,
    UrlRefusal,
    format_time,
    migrate,
    normalise_domain,
)
from store import backup as store_backup
from store import check as store_check

if TYPE_CHECKING:
    from relay.domains import Domains

T = TypeVar("T")


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"postroom: {message}", err=True)
    sys.exit(code)


def settings_of(ctx: click.Context, *, must_exist: bool | None = None) -> Settings:
    try:
        settings: Settings = load_settings(ctx.obj["config"], must_exist=must_exist)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"postroom: config: {problem}", err=True)
        sys.exit(2)
    return settings


def with_spool(settings: Settings, work: Callable[[Spool], Awaitable[T]]) -> T:
    """Open the spool, run `work`, close it; store errors become a clear message and exit 1."""
    if not settings.spool_path.exists():
        fail(f"no spool at {settings.spool_path}: run `postroom init` first")

    async def run() -> T:
        spool = await Spool.open(settings, readers=1)
        try:
            return await work(spool)
        finally:
            await spool.close()

    try:
        return asyncio.run(run())
    except (NotFound, Conflict) as exc:
        fail(str(exc))
    except StoreError as exc:
        fail(f"spool: {exc}")


def emit(data: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        human()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $POSTROOM_CONFIG, ./postroom.toml, /etc/postroom/postroom.toml).",
)
@click.version_option(package_name="postroom")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """Postroom: a self-hosted SMTP relay with an HTTP API."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


@cli.command()
@click.option("--data-dir", type=click.Path(file_okay=False), help="data_dir for a new config.")
@click.option(
    "--dev", is_flag=True,
    help="A new config for development: mail from domains never added is accepted.",
)
@click.pass_context
def init(ctx: click.Context, data_dir: str | None, dev: bool) -> None:
    """Create the config (if missing), the data directory, the spool and a TLS certificate."""
    path, _ = resolve_config_path(ctx.obj["config"])
    if not path.exists():
        text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
        if data_dir is not None:
            text = text.replace(
                'data_dir = "/var/lib/postroom"', f"data_dir = {json.dumps(data_dir)}", 1
            )
        if dev:
            text = text.replace(
                "allow_unconfigured_domains = false", "allow_unconfigured_domains = true", 1
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write the config {path}: {exc.strerror or exc}")
        click.echo(f"wrote {path}")
    else:
        click.echo(f"kept {path} (already there)")
    settings = settings_of(ctx, must_exist=True)
    directory = settings.server.data_dir
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as exc:
        fail(f"cannot create server.data_dir {directory}: {exc.strerror or exc}")
    applied = migrate_spool(settings)
    click.echo(f"spool {settings.spool_path}: " + (", ".join(applied) or "up to date"))
    if settings.smtp.tls_cert is None:
        cert, key = tls_paths(settings)
        if cert.exists() and key.exists():
            click.echo(f"kept TLS certificate {cert}")
        else:
            write_self_signed(cert, key, settings.server.hostname)
            click.echo(f"wrote self-signed TLS certificate {cert} for {settings.server.hostname}")


def migrate_spool(settings: Settings) -> list[str]:
    """Create or upgrade the spool; a spool that cannot be opened is a message and exit 1."""
    try:
        return migrate(settings.spool_path, settings.storage.busy_timeout)
    except StoreError as exc:
        fail(str(exc))


def write_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    """An ECDSA P-256 certificate for `hostname`, localhost and 127.0.0.1, valid ~2 years."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a key file that was already there keeps its mode otherwise
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@cli.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run Postroom: SMTP listeners, the HTTP API and the delivery engine."""
    settings = settings_of(ctx)
    logs.configure(settings)
    if not settings.spool_path.exists():
        fail(f"no spool at {settings.spool_path}: run `postroom init` first")
    config_hint = f" --config {settings.config_path}" if settings.config_path else ""

    def announce(service: Service) -> None:
        smtp = ", ".join(f"{h}:{p}" for h, p in service.smtp_addresses)
        assert service.api_address is not None
        host, port = service.api_address
        click.echo(f"Postroom is listening: SMTP {smtp}; API http://{host}:{port}")
        if service.smtps_addresses:
            smtps = ", ".join(f"{h}:{p}" for h, p in service.smtps_addresses)
            click.echo(f"SMTP with implicit TLS: {smtps}")
        click.echo(f"Create an API key: postroom{config_hint} keys create --name NAME")
        sys.stdout.flush()

    try:
        asyncio.run(Service(settings).run(on_ready=announce))
    except (OSError, StartupError) as exc:
        fail(f"cannot start: {exc}")


@cli.group()
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


@cli.group()
def queue() -> None:
    """Inspect the queue."""


@queue.command("list")
@click.option(
    "--status", type=click.Choice([s.value for s in RecipientStatus]), help="Recipient status."
)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_list(ctx: click.Context, status: str | None, limit: int, as_json: bool) -> None:
    """List messages, newest first."""
    settings = settings_of(ctx)
    wanted = RecipientStatus(status) if status else None
    found = with_spool(settings, lambda spool: spool.list_messages(wanted, limit))
    data = [MessageOut.of(m).to_json() for m in found]

    def human() -> None:
        for msg in data:
            rcpts = ",".join(r["email"] for r in msg["recipients"])
            click.echo(f"{msg['id']}  {msg['status']:<10} {msg['created_at']}  {rcpts}")

    emit(data, as_json, human)


@queue.command("show")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_show(ctx: click.Context, message_id: str, as_json: bool) -> None:
    """Show one message: recipients, their state, and its events."""
    settings = settings_of(ctx)
    message = with_spool(settings, lambda spool: spool.get_message(message_id))
    data = MessageOut.of(message).to_json()

    def human() -> None:
        click.echo(f"{data['id']}  {data['status']}  from {data['from']}  {data['subject']!r}")
        for r in data["recipients"]:
            reply = r["last_reply"]
            said = f"{reply['code']} {reply['enhanced'] or ''} {reply['text']}" if reply else ""
            click.echo(f"  to <{r['email']}> {r['status']} attempts={r['attempts']} {said}")
        for e in data["events"]:
            click.echo(f"  {e['created_at']} {e['type']} {e['recipient'] or ''}")

    emit(data, as_json, human)


@cli.group()
def db() -> None:
    """Spool database maintenance."""


@db.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Apply pending schema migrations."""
    settings = settings_of(ctx)
    if not settings.spool_path.exists():  # a wrong data_dir must not get a new, empty spool
        fail(f"no spool at {settings.spool_path}: run `postroom init` first")
    applied = migrate_spool(settings)
    click.echo(", ".join(applied) if applied else "up to date")


@cli.group()
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


def main() -> None:
    cli(obj={})


def _egress(settings: Settings) -> Egress:
    return Egress(build_webhook_resolver(settings), settings.webhooks.allow_private_networks)


@cli.group()
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


@cli.group()
def events() -> None:
    """Read the event log."""


@events.command("tail")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--type", "kind", type=click.Choice([e.value for e in EventType]))
@click.option("--message", "message_id", help="Only this message's events.")
@click.option("--recipient", help="Only this recipient's events.")
@click.option("-n", "--lines", type=click.IntRange(0, 1000), default=20, show_default=True,
              help="How many of the latest events to show first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def events_tail(
    ctx: click.Context, follow: bool, kind: str | None, message_id: str | None,
    recipient: str | None, lines: int, as_json: bool,
) -> None:
    """Show the latest events, oldest first; with --follow, keep showing new ones."""
    settings = settings_of(ctx)
    where = EventFilter(
        type=EventType(kind) if kind else None, message_id=message_id, recipient=recipient
    )

    def show(event: Event) -> None:
        item = EventItemOut.of(event).model_dump(mode="json")
        if as_json:
            click.echo(json.dumps(item))
            return
        reply = item["data"].get("reply")
        said = f" {reply['code']} {reply.get('enhanced') or ''} {reply['text']}" if reply else ""
        click.echo(
            f"{item['created_at']} {item['id']} {item['type']:<16} {item['message_id'] or '-'}"
            f" to=<{item['recipient'] or ''}>{said}"
        )

    async def work(spool: Spool) -> None:
        # Ids are dense (AUTOINCREMENT, gaps only for rolled-back writes): start `lines` back.
        cursor = max(0, await spool.last_event_id() - lines)
        while True:
            page = await spool.list_events(where, cursor, 100)
            for event in page:
                show(event)
                cursor = event.id
            sys.stdout.flush()
            if len(page) == 100:
                continue
            if not follow:
                return
            await asyncio.sleep(settings.events.stream_poll_interval)

    with contextlib.suppress(KeyboardInterrupt):
        with_spool(settings, work)


_IMPORT_CHUNK = 1000


@cli.group()
def suppressions() -> None:
    """The suppression list: addresses Postroom no longer sends to."""


def _suppression_row(entry: Suppression) -> dict[str, Any]:
    return SuppressionOut.of(entry).model_dump()


@suppressions.command("list")
@click.option("--reason", type=click.Choice([r.value for r in SuppressionReason]))
@click.option("--search", help="Only addresses containing this text.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def suppressions_list(
    ctx: click.Context, reason: str | None, search: str | None, limit: int, as_json: bool
) -> None:
    """List suppressed addresses in address order."""
    settings = settings_of(ctx)
    where = SuppressionFilter(SuppressionReason(reason) if reason else None, search)
    found = with_spool(settings, lambda spool: spool.list_suppressions(where, "", limit))
    data = [_suppression_row(s) for s in found]

    def human() -> None:
        for row in data:
            expires = f" until {row['expires_at']}" if row["expires_at"] else ""
            click.echo(f"{row['email']}  {row['reason']:<12} {row['created_at']}{expires}")

    emit(data, as_json, human)


@suppressions.command("add")
@click.argument("addresses", nargs=-1, required=True)
@click.option("--reason", type=click.Choice([r.value for r in SuppressionReason]),
              default="manual", show_default=True)
@click.option("--expires", "expires", help="ISO 8601 time the entry ends (default: never).")
@click.pass_context
def suppressions_add(
    ctx: click.Context, addresses: tuple[str, ...], reason: str, expires: str | None
) -> None:
    """Suppress addresses (unsubscribe blocks marketing mail only; other reasons, all mail)."""
    settings = settings_of(ctx)
    try:
        expires_at = _parse_expiry(expires) if expires else None
    except ValueError as exc:
        fail(f"--expires: {exc}")
    entries = []
    for address in addresses:
        try:
            entries.append(NewSuppression(normalise_address(address).lower(),
                                          SuppressionReason(reason), expires_at))
        except ValueError as exc:
            fail(f"{address}: {exc}")
    added = with_spool(settings, lambda spool: spool.add_suppressions(entries))
    for entry, new in zip(entries, added, strict=True):
        click.echo(f"{'suppressed' if new else 'already suppressed'} {entry.email}")


def _parse_expiry(value: str) -> float:
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return when.timestamp()


@suppressions.command("remove")
@click.argument("address")
@click.pass_context
def suppressions_remove(ctx: click.Context, address: str) -> None:
    """Take an address off the list."""
    settings = settings_of(ctx)
    with_spool(settings, lambda spool: spool.remove_suppression(address))
    click.echo(f"removed {address.lower()}")


def parse_suppression_csv(
    lines: list[str],
) -> tuple[list[NewSuppression], list[tuple[int, str, str]]]:
    """Entries from CSV rows `email[,reason[,expires_at]]` (a header row is skipped), and the
    rejected lines as (line number, line, why)."""
    entries: list[NewSuppression] = []
    rejected: list[tuple[int, str, str]] = []
    for number, row in enumerate(csv.reader(lines), start=1):
        text = ",".join(row)
        if not row or not "".join(row).strip():
            continue
        cells = [c.strip() for c in row]
        if number == 1 and cells[0].lower() == "email":
            continue
        try:
            if len(cells) > 3:
                raise ValueError("more than 3 columns (email, reason, expires_at)")
            address = normalise_address(cells[0]).lower()
            reason = _import_reason(cells[1] if len(cells) > 1 and cells[1] else "manual")
            expiry = _parse_expiry(cells[2]) if len(cells) > 2 and cells[2] else None
        except ValueError as exc:
            rejected.append((number, text, str(exc)))
            continue
        entries.append(NewSuppression(address, reason, expiry))
    return entries, rejected


def _import_reason(value: str) -> SuppressionReason:
    try:
        return SuppressionReason(value)
    except ValueError:
        names = ", ".join(r.value for r in SuppressionReason)
        raise ValueError(f"reason {value!r} is not one of {names}") from None


@suppressions.command("import")
# utf-8-sig: spreadsheet CSV exports (Excel) start with a BOM, which would stick to the header.
@click.argument("path", type=click.File("r", encoding="utf-8-sig"))
@click.pass_context
def suppressions_import(ctx: click.Context, path: Any) -> None:
    """Import a CSV of `email[,reason[,expires_at]]`; reports the lines it rejects."""
    settings = settings_of(ctx)
    entries, rejected = parse_suppression_csv(path.read().splitlines())

    async def work(spool: Spool) -> int:
        added = 0
        with click.progressbar(length=len(entries), label="importing", file=sys.stderr) as bar:
            for start in range(0, len(entries), _IMPORT_CHUNK):
                chunk = entries[start : start + _IMPORT_CHUNK]
                added += sum(await spool.add_suppressions(chunk))
                bar.update(len(chunk))
        return added

    added = with_spool(settings, work)
    for number, line, why in rejected:
        click.echo(f"line {number}: rejected ({why}): {line}", err=True)
    click.echo(
        f"imported {len(entries)} address(es): {added} new, {len(entries) - added} already "
        f"suppressed; {len(rejected)} line(s) rejected"
    )
    if rejected:
        sys.exit(1)


@suppressions.command("export")
@click.pass_context
def suppressions_export(ctx: click.Context) -> None:
    """Print the whole list as CSV (email, reason, created_at, expires_at, message_id)."""
    settings = settings_of(ctx)

    async def work(spool: Spool) -> None:
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(["email", "reason", "created_at", "expires_at", "message_id"])
        after = ""
        while True:
            page = await spool.list_suppressions(SuppressionFilter(), after, 1000)
            for entry in page:
                row = _suppression_row(entry)
                out.writerow([row["email"], row["reason"], row["created_at"],
                              row["expires_at"] or "", row["message_id"] or ""])
            if len(page) < 1000:
                return
            after = page[-1].email

    with_spool(settings, work)


@cli.group()
def templates() -> None:
    """Message templates (Jinja2: subject, html, text)."""


@templates.command("push")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def templates_push(ctx: click.Context, path: Path, as_json: bool) -> None:
    """Create or replace a template from a TOML or JSON file with name, subject, html, text."""
    from api.templates import check_template

    try:
        raw = path.read_text(encoding="utf-8")
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        fail(f"{path}: cannot read: {exc}")
    try:
        wanted = TemplateIn.model_validate(data)
        check_template(wanted)
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: "
                       f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors()))
    except ApiValidationFailed as exc:
        fail("; ".join(f"{d.field}: {d.message}" for d in exc.details))
    settings = settings_of(ctx)

    async def work(spool: Spool) -> tuple[Template, bool]:
        try:
            await spool.get_template(wanted.name)
        except NotFound:
            created = await spool.create_template(
                wanted.name, wanted.subject, wanted.html, wanted.text
            )
            return created, True
        replaced = await spool.update_template(
            wanted.name, wanted.name, wanted.subject, wanted.html, wanted.text
        )
        return replaced, False

    template, created = with_spool(settings, work)
    data_out = TemplateOut.of(template).model_dump()
    emit(data_out, as_json, lambda: click.echo(
        f"{'created' if created else 'replaced'} {template.name} ({template.id})"
    ))


@templates.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def templates_list(ctx: click.Context, as_json: bool) -> None:
    """List templates."""
    settings = settings_of(ctx)
    found = with_spool(settings, lambda spool: spool.list_templates())
    data = [TemplateOut.of(t).model_dump() for t in found]

    def human() -> None:
        for row in data:
            click.echo(f"{row['id']}  {row['name']}  {row['subject']!r}  {row['updated_at']}")

    emit(data, as_json, human)


@templates.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def templates_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show a template by id or name."""
    settings = settings_of(ctx)
    template = with_spool(settings, lambda spool: spool.get_template(ref))
    data = TemplateOut.of(template).model_dump()

    def human() -> None:
        click.echo(f"{template.id}  {template.name}\nsubject: {template.subject}")
        for part in ("text", "html"):
            if data[part] is not None:
                click.echo(f"--- {part}\n{data[part]}")

    emit(data, as_json, human)


#: Rows per writer job for the long queue operations: short transactions, so `serve` keeps its
#: turns at the spool while they run.
QUEUE_BATCH = 500
_FINISHED = "finished"
_PURGEABLE = [
    s.value for s in MessageStatus if s.value not in {"scheduled", "queued", "deferred", "sending"}
]


def _one_target(message_id: str | None, domain: str | None, every: bool, allow_all: bool) -> None:
    given = sum(x is not None and x is not False for x in (message_id, domain, every))
    if given != 1:
        fail("give exactly one of ID, --domain" + (" or --all" if allow_all else ""))


def _progress(label: str, length: int, hidden: bool) -> Any:
    """A progress bar on stderr (click prints only the label when stderr is not a terminal)."""
    return click.progressbar(length=max(length, 1), label=label, file=sys.stderr, hidden=hidden)


@queue.command("summary")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_summary(ctx: click.Context, as_json: bool) -> None:
    """Pending recipients by destination domain and age (minutes), like Postfix's qshape."""
    settings = settings_of(ctx)
    shape = with_spool(settings, lambda spool: spool.queue_shape())
    data = {
        "buckets": list(shape.labels),
        "total": sum(r.total for r in shape.rows),
        "totals": list(shape.totals),
        "domains": [
            {"domain": r.domain, "total": r.total, "counts": list(r.counts)} for r in shape.rows
        ],
    }

    def human() -> None:
        width = max([len("TOTAL"), *(len(r.domain) for r in shape.rows)])
        click.echo(f"{'':>{width}} {'T':>6} " + " ".join(f"{b:>5}" for b in shape.labels))
        click.echo(
            f"{'TOTAL':>{width}} {data['total']:>6} "
            + " ".join(f"{n:>5}" for n in shape.totals)
        )
        for row in shape.rows:
            click.echo(
                f"{row.domain:>{width}} {row.total:>6} "
                + " ".join(f"{n:>5}" for n in row.counts)
            )

    emit(data, as_json, human)


def _pending_units(spool: Spool, domain: str | None) -> Awaitable[int]:
    async def count() -> int:
        shape = await spool.queue_shape()
        return sum(r.total for r in shape.rows if domain is None or r.domain == domain)

    return count()


@queue.command("retry")
@click.argument("message_id", required=False)
@click.option("--domain", help="Every waiting recipient at this destination domain.")
@click.option("--all", "every", is_flag=True, help="Every waiting recipient.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_retry(
    ctx: click.Context, message_id: str | None, domain: str | None, every: bool, as_json: bool
) -> None:
    """Make waiting (queued or deferred) recipients due now; scheduled ones keep their time."""
    _one_target(message_id, domain, every, allow_all=True)
    settings = settings_of(ctx)
    wanted = domain.rstrip(".").lower() if domain else None

    async def work(spool: Spool) -> int:
        if message_id is not None:
            return await spool.retry(message_id=message_id)
        total = 0
        with _progress("retrying", await _pending_units(spool, wanted), as_json) as bar:
            while True:
                count = await spool.retry(domain=wanted, limit=QUEUE_BATCH)
                total += count
                bar.update(count)
                if count < QUEUE_BATCH:
                    return total

    count = with_spool(settings, work)
    emit({"retried": count}, as_json, lambda: click.echo(f"{count} recipient(s) due now"))


@queue.command("cancel")
@click.argument("message_id", required=False)
@click.option("--domain", help="Every cancellable recipient at this destination domain.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_cancel(
    ctx: click.Context, message_id: str | None, domain: str | None, as_json: bool
) -> None:
    """Cancel recipients not yet delivered and not in flight (each gets `email.cancelled`)."""
    _one_target(message_id, domain, False, allow_all=False)
    settings = settings_of(ctx)
    wanted = domain.rstrip(".").lower() if domain else None

    async def work(spool: Spool) -> CancelResult:
        if message_id is not None:
            return await spool.cancel(message_id=message_id)
        cancelled = 0
        with _progress("cancelling", await _pending_units(spool, wanted), as_json) as bar:
            while True:
                result = await spool.cancel(domain=wanted, limit=QUEUE_BATCH)
                cancelled += result.cancelled
                bar.update(result.cancelled)
                if result.cancelled < QUEUE_BATCH:
                    return CancelResult(cancelled=cancelled, in_flight=result.in_flight)

    result = with_spool(settings, work)
    data = {"cancelled": result.cancelled, "in_flight": result.in_flight}
    emit(
        data,
        as_json,
        lambda: click.echo(
            f"{result.cancelled} recipient(s) cancelled"
            + (f"; {result.in_flight} in flight, left to their attempt" if result.in_flight
               else "")
        ),
    )


@queue.command("purge")
@click.option(
    "--status", "statuses", multiple=True, required=True,
    type=click.Choice([_FINISHED, *_PURGEABLE]),
    help="Message status to remove (repeatable); 'finished': any final status.",
)
@click.option("--older-than", required=True, help="Only messages older than this (e.g. 7d).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue_purge(
    ctx: click.Context, statuses: tuple[str, ...], older_than: str, as_json: bool
) -> None:
    """Remove finished messages with their recipients, events and deliveries of those events."""
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        fail(f"--older-than: {exc}")
    wanted = None if _FINISHED in statuses else frozenset(MessageStatus(s) for s in statuses)
    settings = settings_of(ctx)
    cutoff = time.time() - age

    async def work(spool: Spool) -> int:
        newest = await spool.list_messages(None, 1)
        removed, after = 0, 0
        with _progress("purging", newest[0].seq if newest else 0, as_json) as bar:
            while True:
                batch = await spool.purge(wanted, cutoff, after, QUEUE_BATCH)
                removed += batch.removed
                if batch.next_after is None:
                    return removed
                bar.update(batch.next_after - after)
                after = batch.next_after

    removed = with_spool(settings, work)
    emit({"removed": removed}, as_json, lambda: click.echo(f"{removed} message(s) removed"))


@db.command("backup")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def db_backup(ctx: click.Context, path: Path, as_json: bool) -> None:
    """Copy the spool to a new file PATH: online (safe while serving), consistent, checked."""
    settings = settings_of(ctx)
    try:
        result = store_backup(settings.spool_path, path, settings.storage.busy_timeout)
    except StoreError as exc:
        fail(str(exc))
    data = {"path": str(result.path), "size": result.size, "messages": result.messages}
    emit(
        data,
        as_json,
        lambda: click.echo(
            f"backed up {settings.spool_path} to {result.path} "
            f"({result.size} bytes, {result.messages} message(s))"
        ),
    )


@db.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def db_check(ctx: click.Context, as_json: bool) -> None:
    """Run SQLite's integrity check on the spool (exit 1 on any problem)."""
    settings = settings_of(ctx)
    try:
        problems = store_check(settings.spool_path, settings.storage.busy_timeout)
    except StoreError as exc:
        fail(str(exc))
    emit(
        {"ok": not problems, "problems": problems},
        as_json,
        lambda: click.echo(
            "ok" if not problems else "\n".join(f"problem: {p}" for p in problems)
        ),
    )
    if problems:
        sys.exit(1)


@db.command("rotate-key")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def db_rotate_key(ctx: click.Context, as_json: bool) -> None:
    """Re-encrypt the spool with storage.encryption_key (opening with previous_encryption_key).

    Works in batches, safe while serving; the key check moves to the new key last. A body or
    DKIM key that opens with neither key is damaged: it is skipped, the rest is re-encrypted,
    and the damaged messages and domains are listed at the end (exit 1).
    """
    settings = settings_of(ctx)

    async def work(spool: Spool) -> dict[str, Any]:
        newest = await spool.list_messages(None, 1)
        bodies, after = 0, 0
        skipped: list[str] = []
        with _progress("re-encrypting", newest[0].seq if newest else 0, as_json) as bar:
            while True:
                batch = await spool.reseal(after, 100)
                bodies += batch.changed
                skipped += batch.skipped
                if batch.next_after is None:
                    break
                bar.update(batch.next_after - after)
                after = batch.next_after
        keys = await spool.finish_reseal()
        return {
            "bodies": bodies,
            "domains": keys.changed,
            "damaged_messages": skipped,
            "damaged_domains": list(keys.damaged),
        }

    out = with_spool(settings, work)
    damaged_messages, damaged_domains = out["damaged_messages"], out["damaged_domains"]

    def human() -> None:
        click.echo(
            f"re-encrypted {out['bodies']} body(ies) and the keys of {out['domains']} "
            "domain(s); previous_encryption_key is no longer needed"
        )
        if damaged_messages:
            click.echo(
                f"skipped {len(damaged_messages)} damaged body(ies) that open with neither key "
                "(their mail fails when delivered): " + " ".join(damaged_messages)
            )
        for name in damaged_domains:
            click.echo(
                f"skipped the damaged DKIM keys of {name}: replace them with "
                f"`postroom domains remove {name}` then `postroom domains add {name}`"
            )

    emit(out, as_json, human)
    if damaged_messages or damaged_domains:
        sys.exit(1)


def _when(value: str | None, option: str, now: float) -> float | None:
    """An ISO 8601 date-time, or a duration ago ("7d", "12h")."""
    if value is None:
        return None
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option}: expected a date-time such as 2026-11-23T00:00Z or a duration such as 7d")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


@cli.command()
@click.option("--since", help="Start: a date-time (UTC unless given) or a duration ago (7d).")
@click.option("--until", help="End (exclusive): a date-time or a duration ago. Default: now.")
@click.option("--group-by", type=click.Choice([g.value for g in StatsGrouping]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the shape of GET /v1/stats).")
@click.pass_context
def stats(
    ctx: click.Context, since: str | None, until: str | None, group_by: str | None,
    as_json: bool,
) -> None:
    """Delivery figures for the messages accepted in a window (default: the last 7 days)."""
    settings = settings_of(ctx)
    now = time.time()
    end = _when(until, "--until", now) or now
    start = _when(since, "--since", now)
    start = end - 7 * 86400.0 if start is None else start
    if start >= end:
        fail("--since must be before --until")
    grouping = StatsGrouping(group_by) if group_by else None
    groups = with_spool(settings, lambda spool: spool.stats(start, end, grouping))
    data = StatsOut.of(start, end, grouping, groups).model_dump(mode="json")

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value * 100:.1f}%"

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}s"

    def human() -> None:
        click.echo(f"messages accepted {data['since']} .. {data['until']}")
        header = ("group", "rcpts", "delivered", "pending", "deferred", "bounced", "failed",
                  "suppressed", "cancelled", "bounce", "deferral", "p50", "p95")
        rows = [header]
        for g in data["data"]:
            c = g["counts"]
            pending = c["scheduled"] + c["queued"] + c["sending"]
            rows.append((
                g["group"] or "all", str(g["recipients"]), str(c["delivered"]), str(pending),
                str(c["deferred"]), str(c["bounced"]), str(c["failed"]), str(c["suppressed"]),
                str(c["cancelled"]), pct(g["bounce_rate"]), pct(g["deferral_rate"]),
                secs(g["latency_seconds"]["median"]), secs(g["latency_seconds"]["p95"]),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            click.echo("  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip())

    emit(data, as_json, human)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON: [{check, status, detail}].")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check the config, ports, certificate, spool, DNS and each domain's DKIM/SPF/DMARC.

    Exit 1 when a check fails, 2 when the config does not load (the only check then shown).
    """
    try:
        settings = load_settings(ctx.obj["config"])
    except ConfigError as exc:
        _show_checks([judge_config(None, exc.problems)], as_json)
        sys.exit(2)
    found = asyncio.run(run_checks(settings))
    _show_checks(found, as_json)
    if has_failure(found):
        sys.exit(1)


def _show_checks(found: list[Check], as_json: bool) -> None:
    def human() -> None:
        width = max(len(c.check) for c in found)
        for c in found:
            click.echo(f"{c.status.value:<5} {c.check:<{width}}  {c.detail}")
        counts = {s: sum(c.status.value == s for c in found) for s in ("ok", "warn", "fail")}
        noun = "check" if len(found) == 1 else "checks"
        click.echo(f"{len(found)} {noun}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))

    emit([c.to_json() for c in found], as_json, human)
