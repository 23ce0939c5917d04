"""`postroom suppressions`: list, add, remove, import (CSV) and export the suppression list."""

from __future__ import annotations

import csv
import datetime
import sys
from typing import Any

import click

from api.models import SuppressionOut, normalise_address
from relay.commands.context import emit, fail, settings_of, with_spool
from store import NewSuppression, Spool, Suppression, SuppressionFilter, SuppressionReason

_IMPORT_CHUNK = 1000


@click.group()
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
