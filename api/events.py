"""Event endpoints: page through events, or follow them live as Server-Sent Events.

Both read the spool in short queries (one page each, driven by an index) and hold no read
transaction between pages, so a long-lived stream never keeps the WAL from being checkpointed
(STYLE.md gotcha 17). The stream wakes when a commit appends events and polls otherwise, and
looks its API key up again at most once a poll interval: a revoked key ends the stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from api.auth import authenticate
from api.errors import Detail, ValidationFailed
from api.models import EventItemOut, EventPageOut
from api.types import AppState
from store import EventFilter, EventType, Scope, format_event_id, parse_event_id

MAX_LIMIT = 100
_STREAM_PAGE = 100


def parse_filter(query: QueryParams) -> EventFilter:
    kind = query.get("type")
    if kind is not None and kind not in {e.value for e in EventType}:
        raise ValidationFailed(details=[Detail("type", f"unknown event type {kind!r}")])
    return EventFilter(
        type=EventType(kind) if kind else None,
        message_id=query.get("message_id") or None,
        recipient=query.get("recipient") or None,
    )


def parse_cursor(value: str | None, field: str) -> int | None:
    if value is None or value == "":
        return None
    seq = parse_event_id(value)
    if seq is None:
        raise ValidationFailed(
            "the cursor is not an event id", [Detail(field, "expected an evt_… id")],
            slug="invalid_cursor",
        )
    return seq


def parse_limit(value: str | None, default: int = 50) -> int:
    if value is None:
        return default
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_LIMIT:
        raise ValidationFailed(details=[Detail("limit", f"an integer from 1 to {MAX_LIMIT}")])
    return int(value)


async def list_events(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    await authenticate(request, Scope.FULL)
    where = parse_filter(request.query_params)
    after = parse_cursor(request.query_params.get("after"), "after") or 0
    limit = parse_limit(request.query_params.get("limit"))
    events = await state.spool.list_events(where, after, limit + 1)
    has_more = len(events) > limit
    events = events[:limit]
    # The cursor to continue from: the last event returned, else the one given (caught up).
    cursor = events[-1].id if events else after
    page = EventPageOut(
        data=[EventItemOut.of(e) for e in events],
        next_cursor=format_event_id(cursor) if cursor else None,
    )
    body = page.model_dump(mode="json")
    body["has_more"] = has_more
    return JSONResponse(body)


async def stream_events(request: Request) -> StreamingResponse:
    """SSE: `id:` is the event id; reconnecting with `Last-Event-ID` resumes after it."""
    state: AppState = request.app.state.postroom
    await authenticate(request, Scope.FULL)
    # authenticate() accepted the header's Bearer secret; the stream checks that same secret again.
    secret = request.headers["authorization"].partition(" ")[2].strip()
    where = parse_filter(request.query_params)
    resume = parse_cursor(request.headers.get("last-event-id"), "Last-Event-ID")
    if resume is None:
        resume = parse_cursor(request.query_params.get("after"), "after")
    start = resume if resume is not None else await state.spool.last_event_id()
    cfg = state.settings.events

    async def frames() -> AsyncIterator[bytes]:
        cursor = start
        yield b"retry: 2000\n\n"
        quiet_since = checked_at = time.monotonic()
        while not state.readiness.is_stopping:
            # One indexed key lookup a poll interval (not the rate limit: that is per request).
            if time.monotonic() - checked_at >= cfg.stream_poll_interval:
                if await state.spool.authenticate(secret) is None:
                    return  # revoked: the client's reconnect is answered 401
                checked_at = time.monotonic()
            events = await state.spool.list_events(where, cursor, _STREAM_PAGE)
            for event in events:
                data = json.dumps(EventItemOut.of(event).model_dump(mode="json"))
                yield f"id: {event.public_id}\ndata: {data}\n\n".encode()
                cursor = event.id
            if events:
                quiet_since = time.monotonic()
                if len(events) == _STREAM_PAGE:
                    continue
            await state.spool.wait_for_events(cfg.stream_poll_interval)
            if time.monotonic() - quiet_since >= cfg.stream_keepalive:
                yield b": keepalive\n\n"
                quiet_since = time.monotonic()

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


routes = [
    Route("/v1/events", list_events, methods=["GET"]),
    Route("/v1/events/stream", stream_events, methods=["GET"]),
]
