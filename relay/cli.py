"""The `postroom` command line: set up, serve, and manage keys and the queue.

Owns argument parsing and output (human text, or `--json` for scripts); every command loads the
settings the same way (`--config`, else `POSTROOM_CONFIG`, else `./postroom.toml`, else
`/etc/postroom/postroom.toml`), and a bad config exits 2 with `section.key: reason`, never a
traceback. Work is done through the Spool and the Service, never with SQL here.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from api.models import MessageOut
from config import EXAMPLE_CONFIG, ConfigError, Settings, load_settings, resolve_config_path
from relay.service import Service, StartupError, tls_paths
from store import NotFound, RecipientStatus, Scope, Spool, StoreError, format_time, migrate

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
    except NotFound as exc:
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
@click.pass_context
def init(ctx: click.Context, data_dir: str | None) -> None:
    """Create the config (if missing), the data directory, the spool and a TLS certificate."""
    path, _ = resolve_config_path(ctx.obj["config"])
    if not path.exists():
        text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
        if data_dir is not None:
            text = text.replace(
                'data_dir = "/var/lib/postroom"', f"data_dir = {json.dumps(data_dir)}", 1
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        click.echo(f"wrote {path}")
    else:
        click.echo(f"kept {path} (already there)")
    settings = settings_of(ctx, must_exist=True)
    settings.server.data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    applied = migrate(settings.spool_path, settings.storage.busy_timeout)
    click.echo(f"spool {settings.spool_path}: " + (", ".join(applied) or "up to date"))
    if settings.smtp.tls_cert is None:
        cert, key = tls_paths(settings)
        if cert.exists() and key.exists():
            click.echo(f"kept TLS certificate {cert}")
        else:
            write_self_signed(cert, key, settings.server.hostname)
            click.echo(f"wrote self-signed TLS certificate {cert} for {settings.server.hostname}")


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
    configure_logging(settings.server.log_level)
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


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # aiosmtpd logs every command at INFO and DATA lines (bodies) and AUTH continuations at
    # DEBUG: never let it below WARNING, whatever the root level (STYLE.md gotcha 10).
    logging.getLogger("mail.log").setLevel(logging.WARNING)


# -- keys ---------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Manage API keys (also the SMTP AUTH passwords)."""


@keys.command("create")
@click.option("--name", required=True, help="What the key is for.")
@click.option("--scope", type=click.Choice(["send", "full"]), default="full", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_create(ctx: click.Context, name: str, scope: str, as_json: bool) -> None:
    """Create a key; it is shown once and stored only as a digest."""
    settings = settings_of(ctx)
    new = with_spool(settings, lambda spool: spool.create_key(name, Scope(scope)))
    data = {"id": new.key.id, "key": new.secret, "name": name, "scope": scope}
    emit(
        data,
        as_json,
        lambda: click.echo(
            f"id:    {new.key.id}\nkey:   {new.secret}\nscope: {scope}\n"
            "The key is shown only now: store it safely."
        ),
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """List keys (never their secrets)."""
    settings = settings_of(ctx)
    found = with_spool(settings, lambda spool: spool.list_keys())
    data = [
        {
            "id": k.id,
            "name": k.name,
            "hint": k.hint + "…",
            "scope": k.scope.value,
            "created_at": format_time(k.created_at),
            "revoked_at": format_time(k.revoked_at) if k.revoked_at else None,
        }
        for k in found
    ]

    def human() -> None:
        for row in data:
            state = "revoked" if row["revoked_at"] else "active"
            click.echo(f"{row['id']}  {row['hint']:<10} {row['scope']:<5} {state:<8} {row['name']}")

    emit(data, as_json, human)


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke a key; it stops working at once, over HTTP and SMTP."""
    settings = settings_of(ctx)
    with_spool(settings, lambda spool: spool.revoke_key(key_id))
    click.echo(f"revoked {key_id}")


# -- queue --------------------------------------------------------------------------------------


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


# -- db -----------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Spool database maintenance."""


@db.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Apply pending schema migrations."""
    settings = settings_of(ctx)
    applied = migrate(settings.spool_path, settings.storage.busy_timeout)
    click.echo(", ".join(applied) if applied else "up to date")


def main() -> None:
    cli(obj={})
