"""`postroom init`, `serve` and `doctor`: set up this server, run it, and check it.

`init` writes the config, the data directory, the spool and a self-signed TLS certificate; `serve`
runs the Service until a signal; `doctor` runs the checks of `relay.doctor` and prints them.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from config import EXAMPLE_CONFIG, ConfigError, load_settings, resolve_config_path
from relay import eventloop, logs
from relay.commands.context import emit, fail, migrate_spool, settings_of

if TYPE_CHECKING:
    from relay.doctor import Check
    from relay.service import Service

# relay.service and relay.doctor are imported by the commands that run them: with them (the
# service, the engine, the API app) every other command's start took twice as long.


@click.command()
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
        from relay.service import tls_paths

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


@click.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run Postroom: SMTP listeners, the HTTP API and the delivery engine."""
    from relay.service import Service, StartupError

    settings = settings_of(ctx)
    logs.configure(settings)
    if not settings.spool_path.exists():
        fail(f"no spool at {settings.spool_path}: run `postroom init` first")
    config_hint = f" --config {settings.config_path}" if settings.config_path else ""

    def announce(service: Service) -> None:
        smtp = ", ".join(f"{h}:{p}" for h, p in service.smtp_addresses)
        assert service.api_address is not None
        host, port = service.api_address
        logs.flush()  # the `postroom ready:` line, kept for its loop pass, comes first
        click.echo(f"Postroom is listening: SMTP {smtp}; API http://{host}:{port}")
        if service.smtps_addresses:
            smtps = ", ".join(f"{h}:{p}" for h, p in service.smtps_addresses)
            click.echo(f"SMTP with implicit TLS: {smtps}")
        click.echo(f"Create an API key: postroom{config_hint} keys create --name NAME")
        sys.stdout.flush()
        eventloop.settle_heap()  # start-up is over: what it made is frozen (relay/eventloop.py)

    try:
        eventloop.run(Service(settings).run(on_ready=announce), settings.server.event_loop)
    except (OSError, StartupError, eventloop.LoopUnavailable) as exc:
        fail(f"cannot start: {exc}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON: [{check, status, detail}].")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check the config, ports, certificate, spool, DNS and each domain's DKIM/SPF/DMARC.

    Exit 1 when a check fails, 2 when the config does not load (the only check then shown).
    """
    from relay.doctor import has_failure, judge_config, run_checks

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
