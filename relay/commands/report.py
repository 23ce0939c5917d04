"""`postroom events tail` and `postroom stats`: read the event log and delivery figures."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import sys
import time

import click

from api.models import EventItemOut, StatsOut
from config import parse_duration
from relay.commands.context import emit, fail, settings_of, with_spool
from store import Event, EventFilter, EventType, Spool, StatsGrouping


@click.group()
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


@click.command()
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
