"""The `postroom` command line: set up, serve, and manage keys and the queue.

Owns the `postroom` group, its `--config` option and `main()`; each command group lives in its own
module under `relay.commands` and is added here. Every command loads the settings the same way
(`--config`, else `POSTROOM_CONFIG`, else `./postroom.toml`, else `/etc/postroom/postroom.toml`),
and a bad config exits 2 with `section.key: reason`, never a traceback (`relay.commands.context`).
Work is done through the Spool and the Service, never with SQL here.
"""

from __future__ import annotations

import click

from relay.commands import (
    db,
    domains,
    keys,
    queue,
    report,
    server,
    suppressions,
    templates,
    webhooks,
)

__all__ = ["cli", "main"]


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


for command in (
    server.init,
    server.serve,
    server.doctor,
    keys.keys,
    domains.domains,
    templates.templates,
    suppressions.suppressions,
    webhooks.webhooks,
    report.events,
    report.stats,
    queue.queue,
    db.db,
):
    cli.add_command(command)


def main() -> None:
    cli(obj={})
