"""`postroom db`: spool maintenance: migrate, backup, integrity check and key rotation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from relay.commands.context import emit, fail, migrate_spool, progress, settings_of, with_spool
from store import Spool, StoreError
from store import backup as store_backup
from store import check as store_check


@click.group()
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
        with progress("re-encrypting", newest[0].seq if newest else 0, as_json) as bar:
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
