"""`postroom queue`: list and show messages, the queue's shape, and retry, cancel and purge.

The long operations work in batches of `QUEUE_BATCH` rows, so a running `serve` keeps its turns at
the spool, and show a progress bar on stderr.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

import click

from api.models import MessageOut
from config import parse_duration
from relay.commands.context import emit, fail, progress, settings_of, with_spool
from store import CancelResult, MessageStatus, RecipientStatus, Spool


@click.group()
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
        with progress("retrying", await _pending_units(spool, wanted), as_json) as bar:
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
        with progress("cancelling", await _pending_units(spool, wanted), as_json) as bar:
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
        with progress("purging", newest[0].seq if newest else 0, as_json) as bar:
            while True:
                batch = await spool.purge(wanted, cutoff, after, QUEUE_BATCH)
                removed += batch.removed
                if batch.next_after is None:
                    return removed
                bar.update(batch.next_after - after)
                after = batch.next_after

    removed = with_spool(settings, work)
    emit({"removed": removed}, as_json, lambda: click.echo(f"{removed} message(s) removed"))
